"""Environment and user-data parsing (ferry.vm.userdata): what is accepted, and hostile
input refused with a ConfigError before a VM starts."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.errors import ConfigError
from ferry.vm import userdata
from ferry.vm.userdata import UserDataKind, WriteFile, parse_env, parse_user_data


def test_env_arguments_win_over_files_in_order() -> None:
    env = parse_env(["A=arg", "E="], ["# c\n\nA=one\nB=x=y\n", "B=two \n"])
    assert env == {"A": "arg", "B": "two ", "E": ""}
    assert userdata.env_file_bytes(env) == b"A=arg\nB=two \nE=\n"


@pytest.mark.parametrize("item", ["NOEQUALS", "=v", "1A=v", "A-B=v", "A B=v", "É=v",
                                  "A=line\nbreak", "A=nul\0", "A=cr\r"])
def test_bad_env_entries_are_refused(item: str) -> None:
    with pytest.raises(ConfigError):
        parse_env([item])


def test_env_is_bounded() -> None:
    with pytest.raises(ConfigError, match="at most 256"):
        parse_env([f"V{i}=x" for i in range(257)])
    with pytest.raises(ConfigError, match="bytes"):
        parse_env([f"V{i}={'x' * 1000}" for i in range(40)])
    with pytest.raises(ConfigError):
        parse_env(["A" * 256 + "=x"])
    with pytest.raises(ConfigError):
        parse_env([], ["no separator here\n"])


@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
                       st.text(max_size=40).filter(lambda v: not set(v) & {"\0", "\n", "\r"}),
                       max_size=20))
def test_checked_env_round_trips_through_the_guest_file(env: dict[str, str]) -> None:
    text = userdata.env_file_bytes(userdata.check_env(env)).decode()
    assert parse_env([], [text]) == env


def test_a_script_is_kept_as_is() -> None:
    ud = parse_user_data("#!/bin/sh\necho hi\n")
    assert (ud.kind, ud.script) == (UserDataKind.SCRIPT, b"#!/bin/sh\necho hi\n")


def test_cloud_config_subset() -> None:
    b64 = base64.b64encode(b"\x00\xff").decode()
    ud = parse_user_data(f"""#cloud-config
write_files:
  - path: /etc/a
    content: "hello"
    permissions: '0600'
  - path: /etc/b
    encoding: b64
    content: {b64}
    append: true
  - path: /etc/c
    permissions: 0755
runcmd:
  - echo one
  - [ls, -l, /]
""")
    assert ud.kind is UserDataKind.CLOUD_CONFIG
    assert ud.write_files == (WriteFile("/etc/a", b"hello", 0o600),
                              WriteFile("/etc/b", b"\x00\xff", 0o644, append=True),
                              WriteFile("/etc/c", b"", 0o755))
    assert ud.runcmd == ("echo one", ("ls", "-l", "/"))
    assert parse_user_data("#cloud-config\n").write_files == ()


@pytest.mark.parametrize(("text", "message"), [
    ("echo no shebang", "must start with"),
    ("Content-Type: multipart/mixed", "must start with"),
    ("#include http://x", "must start with"),
    ("#cloud-config\npackages: [nginx]", "packages not supported"),
    ("#cloud-config\n- a list", "mapping"),
    ("#cloud-config\n{unclosed", "not valid YAML"),
    ("#cloud-config\n!!python/object:os.system {}", "not valid YAML"),
    ("#cloud-config\nwrite_files: [{path: relative, content: x}]", "absolute"),
    ("#cloud-config\nwrite_files: [{path: /a/../etc/shadow}]", "absolute"),
    ("#cloud-config\nwrite_files: [{path: /a, content: 5}]", "string"),
    ("#cloud-config\nwrite_files: [{path: /a, permissions: 'rwx'}]", "octal"),
    ("#cloud-config\nwrite_files: [{path: /a, permissions: 99999}]", "range"),
    ("#cloud-config\nwrite_files: [{path: /a, encoding: gzip}]", "encoding"),
    ("#cloud-config\nwrite_files: [{path: /a, encoding: b64, content: '!!'}]", "base64"),
    ("#cloud-config\nwrite_files: [{path: /a, owner: 'www:www'}]", "owner"),
    ("#cloud-config\nwrite_files: [{path: /a, mode: 1}]", "mode not supported"),
    ("#cloud-config\nruncmd: [5]", "runcmd"),
    ("#cloud-config\nruncmd: ['']", "runcmd"),
    ("#cloud-config\nruncmd: [[]]", "runcmd"),
    ("#cloud-config\nruncmd: echo", "list"),
])
def test_hostile_user_data_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_user_data(text)


def test_user_data_is_bounded() -> None:
    parse_user_data("#!/bin/sh\n" + "#" * (userdata.MAX_USER_DATA_BYTES - 10))
    with pytest.raises(ConfigError, match="at most"):
        parse_user_data("#!/bin/sh\n" + "#" * (userdata.MAX_USER_DATA_BYTES - 9))
    many = "#cloud-config\nruncmd:\n" + "  - true\n" * (userdata.MAX_RUNCMD + 1)
    with pytest.raises(ConfigError, match="at most"):
        parse_user_data(many)


def test_a_yaml_bomb_stays_within_the_size_cap() -> None:
    # Aliases expand in memory, not on the wire: safe_load of nested aliases is bounded
    # by the 64 KiB input, and the result is refused as an unknown key anyway.
    bomb = "#cloud-config\na: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nc: [*b, *b, *b, *b]\n"
    with pytest.raises(ConfigError, match="not supported"):
        parse_user_data(bomb)
