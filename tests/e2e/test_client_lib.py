"""libweightd-client from C: a small program compiled against the shared and
the static library of this build, run against a real daemon."""

import os
import shutil
import subprocess

from . import harness as h

PROGRAM = r"""
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "weightd-client.h"

static int events;

static void on_event(const char *json, void *ctx)
{
    (void)ctx;
    if (strstr(json, "\"progress\""))
        events++;
}

#define CHECK(cond, ...) do { if (!(cond)) { printf("FAIL line %d: ", __LINE__); printf(__VA_ARGS__); \
                                             printf("\n"); return 1; } } while (0)

int main(int argc, char **argv)
{
    const char *sock = argv[1], *model = argc > 2 ? argv[2] : NULL;
    char *res = NULL;
    int rc;
    wdc_client *c;

    wdc_close(NULL);
    /* nobody there */
    c = wdc_new();
    CHECK(c, "wdc_new");
    rc = wdc_connect(c, "/nonexistent/weightd.sock", 1000);
    CHECK(rc == -ECONNREFUSED, "connect to nothing: %d", rc);
    CHECK(strcmp(wdc_error_code(c), "ECONNREFUSED") == 0, "code %s", wdc_error_code(c));
    CHECK(strstr(wdc_error_message(c), "/nonexistent/weightd.sock"), "message %s", wdc_error_message(c));
    rc = wdc_call(c, "list", NULL, 1000, NULL, NULL, &res);
    CHECK(rc == -ENOTCONN && res == NULL, "call unconnected: %d", rc);
    wdc_close(c);

    c = wdc_new();
    rc = wdc_connect(c, sock, 10000);
    CHECK(rc == 0, "connect: %d %s", rc, wdc_error_message(c));
    CHECK(strcmp(wdc_socket_path(c), sock) == 0, "socket path %s", wdc_socket_path(c));
    CHECK(wdc_fd(c) >= 0, "fd");
    CHECK(strstr(wdc_server_info(c), "\"version\":\"1.0\""), "server info %s", wdc_server_info(c));
    printf("SERVER %s\n", wdc_server_info(c));

    rc = wdc_call(c, "list", NULL, 10000, NULL, NULL, &res);
    CHECK(rc == 0 && res, "list: %d %s", rc, wdc_error_message(c));
    CHECK(strcmp(wdc_error_code(c), "") == 0, "code after success: %s", wdc_error_code(c));
    printf("LIST %s\n", res);
    free(res);
    res = NULL;

    rc = wdc_call(c, "info", "{\"name\": \"no-such-model\"}", 10000, NULL, NULL, &res);
    CHECK(rc == -ENOENT, "info of a missing model: %d", rc);
    CHECK(res == NULL, "no result on error");
    CHECK(strcmp(wdc_error_code(c), "ENOENT") == 0, "code %s", wdc_error_code(c));
    CHECK(strstr(wdc_error_message(c), "no-such-model"), "message %s", wdc_error_message(c));
    printf("MISSING %d %s %s\n", rc, wdc_error_code(c), wdc_error_message(c));

    rc = wdc_call(c, "frobnicate", NULL, 10000, NULL, NULL, NULL);
    CHECK(rc == -ENOSYS && strcmp(wdc_error_code(c), "ENOSYS") == 0, "unknown op: %d %s", rc, wdc_error_code(c));
    rc = wdc_call(c, "list", "{not json", 10000, NULL, NULL, &res);
    CHECK(rc == -EINVAL, "bad args json: %d", rc);

    if (model) {
        char args[4096];
        snprintf(args, sizeof args, "{\"path\": \"%s\", \"name\": \"from-c\"}", model);
        rc = wdc_call(c, "load", args, 60000, on_event, NULL, &res);
        CHECK(rc == 0, "load: %d %s", rc, wdc_error_message(c));
        CHECK(strstr(res, "\"name\":\"from-c\""), "load result %s", res);
        printf("LOAD %s EVENTS %d\n", res, events);
        free(res);
        rc = wdc_call(c, "verify", "{\"name\": \"from-c\"}", 60000, NULL, NULL, &res);
        CHECK(rc == 0 && strstr(res, "\"match\":true"), "verify: %d %s", rc, res ? res : wdc_error_message(c));
        free(res);

        /* attach: every tensor mapped here, read back; a failed attach whose
         * reply came leaves the connection and its other lease */
        wdc_attachment *a = NULL, *none = NULL;
        rc = wdc_attach(c, "from-c", NULL, 0, 10000, &a);
        CHECK(rc == 0 && a, "attach: %d %s", rc, wdc_error_message(c));
        CHECK(wdc_attachment_tensor_count(a) == 41 && wdc_attachment_handle_count(a) >= 1, "attach counts");
        const wdc_tensor *t = wdc_attachment_find(a, "model.norm.weight");
        CHECK(t && t->n_parts == 1 && t->ndim == 1 && strcmp(t->dtype, "BF16") == 0, "find");
        unsigned char first[8];
        CHECK(wdc_read(a, &t->parts[0], 0, first, sizeof first) == 0, "read");
        CHECK(memcmp(first, t->parts[0].ptr, sizeof first) == 0, "the pointer is the memory");
        CHECK(wdc_read(a, &t->parts[0], t->parts[0].bytes, first, 1) == -ERANGE, "read past the part");
        CHECK(wdc_attachment_find(a, "no.such.tensor") == NULL, "find a missing one");
        CHECK(strstr(wdc_attachment_info(a), "\"handle_type\":\"memfd\""), "info %s", wdc_attachment_info(a));
        rc = wdc_attach(c, "from-c", "99", 0, 10000, &none);
        CHECK(rc == -ENODEV && none == NULL && strcmp(wdc_error_code(c), "ENODEV") == 0, "bad device: %d", rc);
        CHECK(wdc_fd(c) >= 0, "the connection stays");
        rc = wdc_call(c, "leases", NULL, 10000, NULL, NULL, &res);
        CHECK(rc == 0 && strstr(res, "\"lease\":") && strstr(res, "\"model\":\"from-c\""), "leases %s", res);
        free(res);
        CHECK(wdc_poll(c, 0) == 0 && strcmp(wdc_error_code(c), "") == 0, "nothing to hand out");
        rc = wdc_call(c, "unload", "{\"name\": \"from-c\"}", 10000, NULL, NULL, NULL);
        CHECK(rc == -EBUSY && strstr(wdc_error_message(c), "attached by 1 worker"), "unload while leased: %d", rc);
        rc = wdc_detach(c, a, 10000);
        CHECK(rc == 0, "detach: %d %s", rc, wdc_error_message(c));
        rc = wdc_call(c, "leases", NULL, 10000, NULL, NULL, &res);
        CHECK(rc == 0 && strstr(res, "\"leases\":[]"), "no leases left: %s", res);
        free(res);
        rc = wdc_call(c, "unload", "{\"name\": \"from-c\"}", 60000, NULL, NULL, NULL);
        CHECK(rc == 0, "unload: %d %s", rc, wdc_error_message(c));
    }
    wdc_close(c);
    printf("OK\n");
    return 0;
}
"""


def compiler():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


class ClientLibrary(h.E2ETestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.cc = compiler()

    def setUp(self):
        super().setUp()
        if not self.cc:
            self.skipTest("no C compiler")
        self.src = os.path.join(self.tmp, "prog.c")
        with open(self.src, "w") as f:
            f.write(PROGRAM)
        self.san = ["-fsanitize=address,undefined"] if h.SANITIZED else []

    def build(self, out, link):
        cmd = [self.cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I" + os.path.join(h.REPO, "client"),
               "-o", out, self.src] + self.san + link
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, "compile failed: %s\n%s" % (" ".join(cmd), p.stderr))
        return out

    def run_against(self, prog, d, model=None):
        args = [prog, d.sock] + ([model] if model else [])
        r = h.run_program(args, timeout=h.T(120))
        self.assertEqual(r.rc, 0, r)
        self.assertTrue(r.out.endswith("OK\n"), r)
        return r

    def test_shared_library(self):
        prog = self.build(os.path.join(self.tmp, "prog-shared"),
                          ["-L" + h.BUILD, "-lweightd-client", "-Wl,-rpath," + h.BUILD])
        d = self.daemon()
        h.load_ok(self, d, h.checkpoint("small"))
        r = self.run_against(prog, d, h.checkpoint("medium"))
        self.assertIn('"name":"small"', r.out)
        self.assertIn("MISSING -2 ENOENT", r.out)
        events = int(r.out.split("EVENTS ")[1].split()[0])
        self.assertGreater(events, 0, "load events reach the callback")
        # it used the library of this build
        ldd = shutil.which("ldd")
        if ldd:
            p = subprocess.run([ldd, prog], capture_output=True, text=True)
            self.assertIn(os.path.join(h.BUILD, "libweightd-client.so.0"), p.stdout)
        self.assertEqual([m["name"] for m in d.models()], ["small"])

    def test_static_library(self):
        # what the .pc file says a static link needs, with the archive of this build
        archive = os.path.join(h.BUILD, "libweightd-client.a")
        if shutil.which("pkg-config"):
            p = subprocess.run(["pkg-config", "--static", "--libs-only-l", "weightd-client"], capture_output=True,
                               text=True, env=dict(os.environ, PKG_CONFIG_PATH=h.BUILD))
            self.assertEqual(p.returncode, 0, p.stderr)
            link = [archive if f == "-lweightd-client" else f for f in p.stdout.split()]
            self.assertIn(archive, link)
        else:
            link = [archive, "-lcjson", "-lm"]
        prog = self.build(os.path.join(self.tmp, "prog-static"), link)
        p = subprocess.run(["nm", "-D", prog], capture_output=True, text=True) if shutil.which("nm") else None
        if p is not None and p.returncode == 0:
            self.assertNotIn("wdc_connect", p.stdout, "wdc_* comes from the archive, not a shared library")
        d = self.daemon()
        r = self.run_against(prog, d)
        self.assertIn('LIST {"models":[],"next":null}', r.out)

    def test_shared_library_exports_only_the_api(self):
        if not shutil.which("nm"):
            self.skipTest("no nm")
        p = subprocess.run(["nm", "-D", "--defined-only", os.path.join(h.BUILD, "libweightd-client.so.0")],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        names = [l.split()[-1] for l in p.stdout.splitlines() if len(l.split()) == 3 and l.split()[1] in "TDBR"]
        self.assertTrue(names)
        self.assertEqual([n for n in names if not n.startswith("wdc_")], [], "symbols outside the API")
        with open(os.path.join(h.REPO, "client", "weightd-client.h")) as f:
            header = f.read()
        for n in names:
            self.assertIn(n + "(", header, "%s is exported but not declared" % n)

    def test_pkg_config_file(self):
        if not shutil.which("pkg-config"):
            self.skipTest("no pkg-config")
        env = dict(os.environ, PKG_CONFIG_PATH=h.BUILD)
        p = subprocess.run(["pkg-config", "--cflags", "--libs", "weightd-client"], capture_output=True, text=True,
                           env=env)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("-lweightd-client", p.stdout.split())
        v = subprocess.run(["pkg-config", "--modversion", "weightd-client"], capture_output=True, text=True,
                           env=env)
        version = h.run_program([h.WEIGHTD, "--version"]).out.split()[1]
        self.assertEqual(v.stdout.strip(), version)
        s = subprocess.run(["pkg-config", "--static", "--libs", "weightd-client"], capture_output=True, text=True,
                           env=env)
        self.assertIn("-lcjson", s.stdout.split(), "a static link needs cJSON too")
        self.assertIn("-lm", s.stdout.split(), "and libm (common/size.c)")
