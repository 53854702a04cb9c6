"""weightd's and weightctl's command lines: help, version, bad flags, the
config file and the environment, and their precedence."""

import os
import socket
import time

from . import harness as h

GiB = 1 << 30


class WeightdCommandLine(h.E2ETestCase):

    def test_help_lists_every_option(self):
        r = h.run_program([h.WEIGHTD, "--help"])
        self.assertEqual(r.rc, 0, r)
        for opt in ("--socket", "--backend", "--devices", "--host-devices", "--host-capacity", "--alloc-conf",
                    "--load-alloc-conf", "--config", "--log-level", "--help", "--version"):
            self.assertIn(opt, r.out, "weightd --help does not mention %s" % opt)
        self.assertIn("usage: weightd", r.out)
        # -h is the same
        self.assertEqual(h.run_program([h.WEIGHTD, "-h"]).out, r.out)

    def test_version(self):
        r = h.run_program([h.WEIGHTD, "--version"])
        self.assertEqual(r.rc, 0, r)
        self.assertRegex(r.out, r"^weightd \d+\.\d+\.\d+ ")
        self.assertIn("protocol 1.0", r.out)
        self.assertIn("host", r.out)
        c = h.run_program([h.WEIGHTCTL, "--version"])
        self.assertEqual(c.rc, 0, c)
        self.assertRegex(c.out, r"^weightctl \d+\.\d+\.\d+")
        # both from the same build
        self.assertEqual(r.out.split()[1], c.out.split()[1])

    def test_bad_flags_and_values_exit_2(self):
        sock = os.path.join(self.tmp, "never.sock")
        cases = [
            (["--bogus"], "--bogus"),
            (["--host-devices", "abc"], "host_devices"),
            (["--host-devices", "0"], "host_devices"),
            (["--host-devices", "65"], "host_devices"),
            (["--host-capacity", "12XB"], "host_capacity"),
            (["--host-capacity", "0"], "host_capacity"),
            (["--log-level", "loud"], "log_level"),
            (["--max-clients", "-1"], "max_clients"),
            (["--socket"], "needs a value"),
            (["stray"], "stray"),
            (["--host-devices=x"], "host_devices"),
        ]
        for args, words in cases:
            with self.subTest(args=args):
                r = h.run_program([h.WEIGHTD, "--socket", sock] + args)
                self.assertEqual(r.rc, 2, r)
                self.assertTrue(r.err.startswith("weightd: "), r)
                self.assertIn(words, r.err)
                self.assertEqual(r.err.count("\n"), 1, "one clear line: %r" % r.err)
                self.assertFalse(os.path.exists(sock))

    def test_unknown_backend_fails_clearly(self):
        sock = os.path.join(self.tmp, "never.sock")
        r = h.run_program([h.WEIGHTD, "--socket", sock, "--backend", "warp-drive"])
        self.assertEqual(r.rc, 2, r)
        self.assertIn("warp-drive", r.err)
        self.assertIn("backend", r.err)
        self.assertIn("host", r.err, "the message should list the backends that exist")
        self.assertFalse(os.path.exists(sock))

    def test_bad_allocator_configuration_fails_clearly(self):
        sock = os.path.join(self.tmp, "never.sock")
        for flag in ("--alloc-conf", "--load-alloc-conf"):
            with self.subTest(flag=flag):
                r = h.run_program([h.WEIGHTD, "--socket", sock, "--backend", "host", flag, "no_such_key:1"])
                self.assertEqual(r.rc, 2, r)
                self.assertIn("no_such_key", r.err)
                self.assertFalse(os.path.exists(sock))

    def test_equals_form_and_size_suffixes(self):
        d = self.daemon("--host-capacity=1536MiB", "--host-devices=2", host_flags=False)
        devs = d.stats()["devices"]
        self.assertEqual(len(devs), 2)
        self.assertEqual(devs[0]["capacity"], 1536 << 20)
        # K/M/G/T are powers of 1000, KiB/MiB/GiB/TiB powers of 1024 (common/size.h)
        for text, value in (("2G", 2 * 10**9), ("3GiB", 3 * GiB), ("512M", 512 * 10**6), ("1.5GiB", 3 * GiB // 2),
                            ("1T", 10**12), ("1TiB", 1 << 40)):
            with self.subTest(size=text):
                e = self.daemon("--backend", "host", "--host-capacity", text, host_flags=False,
                                sock=os.path.join(self.tmp, "s-%s.sock" % text))
                self.assertEqual(e.device(0)["capacity"], value)
                self.assertClean(e, e.stop())


class WeightdConfiguration(h.E2ETestCase):

    def write_config(self, text, name="weightd.conf"):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def capacity_and_devices(self, d):
        devs = d.stats()["devices"]
        return devs[0]["capacity"], len(devs)

    def test_config_file(self):
        conf = self.write_config("# weightd test configuration\n"
                                 "backend = host\n"
                                 "host_devices = 3\n"
                                 "host-capacity = 1GiB   # a comment after a value\n"
                                 "\n"
                                 "load_alloc_conf = max_split_size_mb:40\n")
        d = self.daemon("--config", conf, host_flags=False)
        self.assertEqual(self.capacity_and_devices(d), (GiB, 3))
        self.assertEqual(d.stats()["policy"]["load"], "max_split_size_mb:40")

    def test_precedence_cli_over_env_over_file(self):
        conf = self.write_config("host_devices = 3\nhost_capacity = 1GiB\nlog_level = debug\n")
        env = {"WEIGHTD_HOST_CAPACITY": "2GiB", "WEIGHTD_LOG_LEVEL": "notice"}
        # file alone
        d1 = self.daemon("--config", conf, "--backend", "host", host_flags=False, sock=os.path.join(self.tmp, "1.sock"))
        self.assertEqual(self.capacity_and_devices(d1), (GiB, 3))
        self.assertIn(" debug: ", self.wait_for_log(d1, " debug: "))
        # the environment beats the file; the file still gives what the environment does not
        d2 = self.daemon("--config", conf, "--backend", "host", env=env, host_flags=False,
                         sock=os.path.join(self.tmp, "2.sock"))
        self.assertEqual(self.capacity_and_devices(d2), (2 * GiB, 3))
        # the command line beats both
        d3 = self.daemon("--config", conf, "--backend", "host", "--host-capacity", "3GiB", "--log-level", "info",
                         env=env, host_flags=False, sock=os.path.join(self.tmp, "3.sock"))
        self.assertEqual(self.capacity_and_devices(d3), (3 * GiB, 3))
        for d in (d1, d2, d3):
            self.assertClean(d, d.stop())
        # levels: debug (file) logs debug lines; notice (env) hides info; info (CLI) shows info
        self.assertNotIn(" info: ", d2.log())
        self.assertIn(" notice: ", d2.log())
        self.assertIn(" info: ", d3.log())
        self.assertNotIn(" debug: ", d3.log())

    def wait_for_log(self, d, text):
        # a debug line is written when a client connects: stats made one
        return h.wait_until(lambda: d.log() if text in d.log() else None, h.T(10), what=repr(text))

    def test_environment_alone_and_weightd_config_variable(self):
        conf = self.write_config("host_devices = 2\n")
        sock = os.path.join(self.tmp, "env.sock")
        env = {"WEIGHTD_CONFIG": conf, "WEIGHTD_HOST_CAPACITY": "768MiB", "WEIGHTD_BACKEND": "host",
               "WEIGHTD_SOCKET": sock}
        d = self.daemon(env=env, host_flags=False, pass_socket=False, sock=sock)
        self.assertEqual(self.capacity_and_devices(d), (768 << 20, 2))
        # weightctl finds the daemon through $WEIGHTD_SOCKET too
        r = h.run_ctl(None, "list", env={"WEIGHTD_SOCKET": sock})
        self.assertEqual(r.rc, 0, r)
        self.assertIn("no models loaded", r.out)

    def test_socket_from_config_file_and_cli_override(self):
        sock_file = os.path.join(self.tmp, "from-file.sock")
        sock_cli = os.path.join(self.tmp, "from-cli.sock")
        conf = self.write_config("socket = %s\nbackend = host\n" % sock_file)
        d = self.daemon("--config", conf, host_flags=False, pass_socket=False, sock=sock_file)
        self.assertTrue(h.can_connect(sock_file))
        self.assertClean(d, d.stop())
        e = self.daemon("--config", conf, "--socket", sock_cli, host_flags=False, pass_socket=False, sock=sock_cli)
        self.assertTrue(h.can_connect(sock_cli))
        self.assertFalse(os.path.exists(sock_file))
        self.assertClean(e, e.stop())

    def test_bad_config_files(self):
        sock = os.path.join(self.tmp, "never.sock")
        cases = [
            ("no_such_option = 1\n", "no_such_option"),
            ("host_devices = many\n", "host_devices"),
            ("just words\n", "key = value"),
            ("config = other.conf\n", "config"),
        ]
        for i, (text, words) in enumerate(cases):
            with self.subTest(text=text):
                conf = self.write_config("# line 1\n" + text, "bad%d.conf" % i)
                r = h.run_program([h.WEIGHTD, "--socket", sock, "--config", conf])
                self.assertEqual(r.rc, 2, r)
                self.assertIn("%s:2" % conf, r.err, "the message names the file and line")
                self.assertIn(words, r.err)
        missing = os.path.join(self.tmp, "missing.conf")
        r = h.run_program([h.WEIGHTD, "--socket", sock, "--config", missing])
        self.assertEqual(r.rc, 2, r)
        self.assertIn(missing, r.err)
        self.assertIn("No such file", r.err)
        self.assertFalse(os.path.exists(sock))


class WeightctlCommandLine(h.E2ETestCase):

    def test_help_lists_every_command(self):
        r = h.run_program([h.WEIGHTCTL, "--help"])
        self.assertEqual(r.rc, 0, r)
        for cmd in ("load", "unload", "list", "info", "verify", "stats", "shutdown", "inspect", "--json",
                    "--socket", "--timeout"):
            self.assertIn(cmd, r.out)

    def test_usage_errors_exit_2(self):
        # No daemon: a usage error is found before weightctl tries to connect.
        sock = os.path.join(self.tmp, "nobody-listens.sock")
        cases = [
            [],
            ["frobnicate"],
            ["--bogus", "list"],
            ["list", "extra"],
            ["stats", "extra"],
            ["shutdown", "now"],
            ["info"],
            ["info", "a", "b"],
            ["unload"],
            ["verify"],
            ["load"],
            ["load", "a", "b"],
            ["load", "x", "--device", "-2"],
            ["load", "x", "--device", "-1"],
            ["load", "x", "--frob"],
            ["inspect"],
            ["--timeout", "soon", "list"],
        ]
        for args in cases:
            with self.subTest(args=args):
                r = h.run_program([h.WEIGHTCTL, "--socket", sock] + args)
                self.assertEqual(r.rc, 2, r)
                self.assertTrue(r.err.strip(), "a usage error says why")
                self.assertEqual(r.out, "")

    def test_timeout_when_the_daemon_says_nothing(self):
        # a socket that accepts and never answers
        sock = os.path.join(self.tmp, "silent.sock")
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(sock)
        srv.listen(4)
        self.addCleanup(srv.close)
        t0 = time.monotonic()
        r = h.run_program([h.WEIGHTCTL, "--socket", sock, "--timeout", "0.5", "list"], timeout=h.T(30))
        elapsed = time.monotonic() - t0
        self.assertEqual(r.rc, 1, r)
        self.assertIn("no answer from weightd", r.err)
        self.assertLess(elapsed, h.T(10))
        r = h.run_program([h.WEIGHTCTL, "--socket", sock, "--json", "--timeout", "0.5", "stats"], timeout=h.T(30))
        self.assertJsonError(r, "ETIMEDOUT")

    def test_no_daemon(self):
        sock = os.path.join(self.tmp, "nobody.sock")
        r = h.run_ctl(sock, "list")
        self.assertEqual(r.rc, 1, r)
        self.assertIn("not running", r.err)
        self.assertIn(sock, r.err)
        j = h.run_ctl(sock, "stats", json_mode=True)
        err = self.assertJsonError(j, "ECONNREFUSED")
        self.assertIn(sock, err["message"])
