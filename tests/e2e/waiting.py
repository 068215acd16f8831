"""Waiting on conditions instead of sleeping and hoping.

`eventually` polls until something is true and fails naming what it waited for;
`stays` is the one honest way to let time pass on purpose: it checks that
something remains true for a stated time (to prove that nothing happened) and
fails as soon as it does not.
"""

import time


def _describe(what, condition):
    if callable(what):
        return what()
    return what or getattr(condition, "__name__", repr(condition))


def eventually(condition, timeout=10.0, what=None, interval=0.05, retry_on=(AssertionError,)):
    """Calls `condition()` until it returns something truthy, and returns that.

    An exception of a `retry_on` type counts as "not yet". At the deadline it
    raises AssertionError naming `what` (a string, or a callable giving one at
    that moment) with the last value or exception seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        error = None
        try:
            value = condition()
        except retry_on as e:
            value, error = None, e
        if error is None and value:
            return value
        if time.monotonic() >= deadline:
            last = f"last error: {error!r}" if error is not None else f"last value: {value!r}"
            raise AssertionError(
                f"timed out after {timeout} s waiting for {_describe(what, condition)} ({last})") from error
        time.sleep(interval)


def stays(condition, duration, what=None, interval=0.02):
    """Checks that `condition()` stays truthy for `duration` seconds, on purpose.

    Fails at once, naming `what`, the first time it does not hold.
    """
    deadline = time.monotonic() + duration
    while True:
        value = condition()
        assert value, f"expected {_describe(what, condition)} to hold for {duration} s; it stopped: {value!r}"
        if time.monotonic() >= deadline:
            return value
        time.sleep(interval)
