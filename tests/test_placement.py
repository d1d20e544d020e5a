"""Joining Ray: an address nobody answers fails within the timeout, naming the address."""
import time

import pytest

from learner_jax.placement import check_reachable


def test_an_address_nobody_answers_fails_fast_naming_it():
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="ray.address 127.0.0.1:9: no Ray head answers"):
        check_reachable("127.0.0.1:9", 2.0)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ValueError, match="expected host:port"):
        check_reachable("localhost", 1.0)
