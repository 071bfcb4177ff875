import time

from receiver.tuning import short_sleeps


def test_only_the_reactor_turn_is_shortened() -> None:
    fake = short_sleeps(0.0001)
    started = time.perf_counter()
    for _ in range(50):
        fake.sleep(0.001)
    shortened = time.perf_counter() - started
    started = time.perf_counter()
    fake.sleep(0.02)
    kept = time.perf_counter() - started
    assert kept >= 0.02  # other sleeps last as long as asked
    assert shortened < 50 * 0.001  # fifty turns took less than fifty milliseconds
    assert fake.monotonic is time.monotonic
