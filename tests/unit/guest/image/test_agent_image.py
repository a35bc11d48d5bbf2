"""The [agent] blueprint table, hooks.conf, and compiling the agent into the cache."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ferry.errors import ConfigError
from ferry.guest.agent.hooks import AgentSpec
from ferry.guest.image import agent as agent_build
from ferry.guest.image.blueprint import _input_key, parse_blueprint
from ferry.guest.image.elf import read_elf
from ferry.guest.image.errors import BlueprintError


def test_agent_table_parses(tmp_path: Path) -> None:
    bp = parse_blueprint('name = "x"\n[agent]\nbefore_suspend = ["redis-cli save", "sync"]\n'
                         'after_resume = ["date"]\n', base_dir=tmp_path)
    assert bp.agent == AgentSpec(enabled=True, before_suspend=("redis-cli save", "sync"),
                                 after_resume=("date",))
    assert parse_blueprint('name = "x"', base_dir=tmp_path).agent == AgentSpec()
    assert not parse_blueprint('name = "x"\n[agent]\nenabled = false\n',
                               base_dir=tmp_path).agent.enabled


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ("bogus = 1", "unknown \\[agent\\] keys"),
        ("enabled = 1", "enabled must be a boolean"),
        ('before_suspend = "sync"', "list of strings"),
        ('after_resume = ["a\\nb"]', "one non-empty line"),
        ('after_resume = ["  "]', "one non-empty line"),
        ('enabled = false\nbefore_suspend = ["sync"]', "need enabled = true"),
    ],
)
def test_bad_agent_tables_are_blueprint_errors(tmp_path: Path, table: str, match: str) -> None:
    with pytest.raises(BlueprintError, match=match) as info:
        parse_blueprint(f'name = "x"\n[agent]\n{table}\n', base_dir=tmp_path, path="bp.toml")
    assert str(info.value).startswith("bp.toml: ")
    assert isinstance(info.value, ConfigError)


def test_hooks_conf_is_read_the_way_the_agent_reads_it(tmp_path: Path) -> None:
    spec = AgentSpec(before_suspend=("redis-cli save", "sync"), after_resume=("echo 'x y'",))
    conf = tmp_path / "hooks.conf"
    conf.write_bytes(spec.hooks_conf())
    # The agent takes lines starting with "<phase> " and runs the rest with sh -c.
    script = f"sed -n 's/^before_suspend //p' {conf}"
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["redis-cli save", "sync"]
    script = f"sed -n 's/^after_resume //p' {conf}"
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["echo 'x y'"]


def test_image_key_covers_the_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = parse_blueprint('name = "x"', base_dir=tmp_path)
    hooked = parse_blueprint('name = "x"\n[agent]\nafter_resume = ["date"]\n', base_dir=tmp_path)
    bare = parse_blueprint('name = "x"\n[agent]\nenabled = false\n', base_dir=tmp_path)
    keys = {_input_key(bp, "k", {}) for bp in (plain, hooked, bare)}
    assert len(keys) == 3
    monkeypatch.setattr(agent_build, "agent_source_digest", lambda: "other source")
    assert _input_key(plain, "k", {}) not in keys
    assert _input_key(bare, "k", {}) in keys  # no agent: its source does not matter


def test_agent_compiles_static_and_is_cached(tmp_path: Path) -> None:
    binary = agent_build.agent_binary(tmp_path)
    info = read_elf(binary)
    assert info.interpreter is None
    assert not info.needed
    mtime = binary.stat().st_mtime_ns
    assert agent_build.agent_binary(tmp_path) == binary
    assert binary.stat().st_mtime_ns == mtime
    assert agent_build.agent_source_digest()[:16] == binary.parent.name
