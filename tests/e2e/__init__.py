"""weightd's end-to-end tests: real weightd, weightctl and weightd-mkckpt
processes, raw Unix sockets, Python 3 standard library only.

    make e2e                              # against build/
    make e2e SANITIZE=address,undefined   # against build-san/
    WEIGHTD_BUILD=/path/to/build python3 -m unittest discover -s tests/e2e -t .
    WEIGHTD_BUILD=$PWD/build python3 -m unittest tests.e2e.test_protocol -v

Helpers are in harness.py."""
