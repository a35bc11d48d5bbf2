/*
 * oci-exec: start an OCI image's process the way a container runtime does.
 *
 *   oci-exec ROOT USER WORKDIR N ENV_1 .. ENV_N ARGV_0 [ARGV_1 ..]
 *
 * chroot(ROOT); resolve USER ("", "name", "uid", "name:group", "uid:gid") in ROOT's own
 * /etc/passwd and /etc/group (fgetpwent/fgetgrent: plain files, no NSS, which a static
 * binary cannot load); chdir(WORKDIR), creating it if missing as Docker does; set the
 * supplementary groups to those /etc/group lists a named user in (none for a bare
 * uid), then gid, then uid; replace the environment with ENV_1..ENV_N
 * (plus HOME from the user's passwd entry if none of them sets it, as Docker does);
 * exec ARGV_0 (looked up in that environment's PATH). Built static by ferry.oci.guest
 * and run by /ferry/oci-run in ferry's guest root, so the image needs no shell.
 * Exit codes as a shell's: 126 setup failed, 127 the program was not found.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int fail(const char *what, const char *arg) {
    fprintf(stderr, "ferry-oci: %s %s: %s\n", what, arg, strerror(errno));
    return 126;
}

static int numeric(const char *s, unsigned long *out) {
    char *end;
    if (!*s) return 0;
    errno = 0;
    *out = strtoul(s, &end, 10);
    return *end == 0 && errno == 0 && *out <= 0xFFFFFFFEul;
}

/* Look a user up in /etc/passwd (by name or uid); 0 if absent. */
static int find_user(const char *name, unsigned long uid, int by_uid, struct passwd *found) {
    FILE *f = fopen("/etc/passwd", "re");
    struct passwd *p;
    int hit = 0;
    while (f && (p = fgetpwent(f)) != NULL) {
        if (by_uid ? p->pw_uid == uid : strcmp(p->pw_name, name) == 0) {
            found->pw_uid = p->pw_uid;
            found->pw_gid = p->pw_gid;
            found->pw_dir = strdup(p->pw_dir ? p->pw_dir : "/");
            hit = 1;
            break;
        }
    }
    if (f) fclose(f);
    return hit;
}

static int find_group(const char *name, gid_t *gid) {
    FILE *f = fopen("/etc/group", "re");
    struct group *g;
    int hit = 0;
    while (f && (g = fgetgrent(f)) != NULL) {
        if (strcmp(g->gr_name, name) == 0) { *gid = g->gr_gid; hit = 1; break; }
    }
    if (f) fclose(f);
    return hit;
}

/* The gids of the groups /etc/group lists ``name`` as a member of (at most ``max``). */
static int member_groups(const char *name, gid_t *gids, int max) {
    FILE *f = fopen("/etc/group", "re");
    struct group *g;
    int n = 0;
    while (f && n < max && (g = fgetgrent(f)) != NULL) {
        for (char **m = g->gr_mem; m && *m; m++) {
            if (strcmp(*m, name) == 0) { gids[n++] = g->gr_gid; break; }
        }
    }
    if (f) fclose(f);
    return n;
}

static void mkdirs(const char *path) {
    char buf[4096];
    size_t n = strlen(path);
    if (n >= sizeof buf) return;
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p == '/') { *p = 0; mkdir(buf, 0755); *p = '/'; }
    }
    mkdir(buf, 0755);
}

int main(int argc, char **argv) {
    unsigned long n;
    if (argc < 6 || !numeric(argv[4], &n) || (unsigned long)argc < 6 + n) {
        fprintf(stderr, "usage: oci-exec ROOT USER WORKDIR N ENV.. ARGV..\n");
        return 126;
    }
    const char *root = argv[1], *workdir = argv[3];
    char user[256];
    snprintf(user, sizeof user, "%s", argv[2]);
    if (chroot(root) != 0) return fail("chroot", root);
    if (chdir("/") != 0) return fail("chdir", "/");

    char *group = strchr(user, ':');
    if (group) *group++ = 0;
    unsigned long id;
    uid_t uid = 0;
    gid_t gid = 0;
    struct passwd pw = {0};
    if (!*user) {
        uid = 0;
        if (find_user(NULL, 0, 1, &pw)) gid = pw.pw_gid;
    } else if (numeric(user, &id)) {
        uid = (uid_t)id;
        if (find_user(NULL, id, 1, &pw)) gid = pw.pw_gid;  /* Docker: the user's group */
    } else if (find_user(user, 0, 0, &pw)) {
        uid = pw.pw_uid;
        gid = pw.pw_gid;
    } else {
        fprintf(stderr, "ferry-oci: no user %s in the image's /etc/passwd\n", user);
        return 126;
    }
    if (group && *group) {
        if (numeric(group, &id)) {
            gid = (gid_t)id;
        } else if (!find_group(group, &gid)) {
            fprintf(stderr, "ferry-oci: no group %s in the image's /etc/group\n", group);
            return 126;
        }
    }

    mkdirs(workdir);
    if (chdir(workdir) != 0) return fail("chdir", workdir);
    gid_t groups[64];
    int ngroups = *user && !numeric(user, &id) ? member_groups(user, groups, 64) : 0;
    if (setgroups((size_t)ngroups, groups) != 0) return fail("setgroups", user);
    if (setgid(gid) != 0) return fail("setgid", group ? group : "");
    if (setuid(uid) != 0) return fail("setuid", user);

    if (clearenv() != 0) return fail("clearenv", "");
    for (unsigned long i = 0; i < n; i++) {
        if (putenv(argv[5 + i]) != 0) return fail("putenv", argv[5 + i]);
    }
    /* Docker: HOME, unless the image or -e set it, is the user's home (else /). */
    if (!getenv("HOME") && setenv("HOME", pw.pw_dir ? pw.pw_dir : "/", 1) != 0)
        return fail("setenv", "HOME");
    char **args = argv + 5 + n;
    execvp(args[0], args);
    int e = errno;
    fprintf(stderr, "ferry-oci: exec %s: %s\n", args[0], strerror(e));
    return e == ENOENT ? 127 : 126;
}
