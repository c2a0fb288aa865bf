"""LogManager: Snorkel's counter and trigger semantics, cleanup, and state round trip."""

import json
from dataclasses import dataclass, field

import pytest

from jaxmtl.training.config import LogManagerConfig
from jaxmtl.training.log_manager import LogManager


@dataclass
class FakeCheckpointer:
    """Stands in for the Checkpointer: the attributes LogManager uses, and a call log."""

    checkpoint_factor: int = 1
    calls: list = field(default_factory=list)

    def clear(self) -> None:
        self.calls.append("clear")

    def load_best_model(self, model):
        self.calls.append("load_best_model")
        return ("best", model)


class FakeWriter:
    def __init__(self) -> None:
        self.cleaned = 0

    def cleanup(self) -> None:
        self.cleaned += 1


def _step(log_manager: LogManager, batch_size: int) -> tuple[bool, bool]:
    log_manager.update(batch_size)
    return log_manager.trigger_evaluation(), log_manager.trigger_checkpointing()


def test_points() -> None:
    log_manager = LogManager(n_batches_per_epoch=10, checkpointer=FakeCheckpointer(2),
                             counter_unit="points", evaluation_freq=10)
    assert _step(log_manager, 5) == (False, False)
    assert _step(log_manager, 5) == (True, False)
    assert _step(log_manager, 10) == (True, True)
    assert _step(log_manager, 5) == (False, False)
    assert log_manager.point_count == 5
    assert log_manager.point_total == 25
    assert log_manager.batch_total == 4
    assert log_manager.epoch_total == pytest.approx(0.4)
    assert log_manager.unit_total == 25


def test_batches() -> None:
    log_manager = LogManager(n_batches_per_epoch=5, checkpointer=FakeCheckpointer(2),
                             counter_unit="batches", evaluation_freq=2)
    assert _step(log_manager, 5) == (False, False)
    assert _step(log_manager, 5) == (True, False)
    assert _step(log_manager, 10) == (False, False)
    assert _step(log_manager, 5) == (True, True)
    assert log_manager.batch_count == 0
    assert log_manager.point_total == 25
    assert log_manager.batch_total == 4
    assert log_manager.epoch_total == pytest.approx(0.8)
    assert log_manager.unit_total == 4


def test_epochs() -> None:
    log_manager = LogManager(n_batches_per_epoch=2, checkpointer=FakeCheckpointer(2),
                             counter_unit="epochs", evaluation_freq=1)
    assert _step(log_manager, 5) == (False, False)
    assert log_manager.epoch_count == pytest.approx(0.5)
    assert _step(log_manager, 5) == (True, False)
    assert _step(log_manager, 10) == (False, False)
    assert _step(log_manager, 5) == (True, True)
    assert log_manager.batch_count == 0
    assert log_manager.point_total == 25
    assert log_manager.batch_total == 4
    assert log_manager.epoch_total == 2


def test_fractional_epoch_frequency() -> None:
    """evaluation_freq=0.5 epochs over 4 batches per epoch: every 2nd batch."""
    log_manager = LogManager(n_batches_per_epoch=4, evaluation_freq=0.5)
    triggers = [_step(log_manager, 1)[0] for _ in range(8)]
    assert triggers == [False, True] * 4


def test_defaults_and_config() -> None:
    default = LogManager(n_batches_per_epoch=3)
    assert (default.counter_unit, default.evaluation_freq) == ("epochs", 1.0)
    from_config = LogManager(3, config=LogManagerConfig(counter_unit="batches",
                                                        evaluation_freq=2))
    assert (from_config.counter_unit, from_config.evaluation_freq) == ("batches", 2)
    from_dict = LogManager(3, config={"counter_unit": "points"}, evaluation_freq=7)
    assert (from_dict.counter_unit, from_dict.evaluation_freq) == ("points", 7)


def test_no_checkpointer_never_checkpoints() -> None:
    log_manager = LogManager(n_batches_per_epoch=1, counter_unit="batches", evaluation_freq=1)
    assert _step(log_manager, 1) == (True, False)


def test_cleanup_without_checkpointer_returns_model() -> None:
    writer = FakeWriter()
    log_manager = LogManager(n_batches_per_epoch=2, log_writer=writer)
    model = object()
    assert log_manager.cleanup(model) is model
    assert writer.cleaned == 1


def test_cleanup_loads_best_model() -> None:
    writer, checkpointer = FakeWriter(), FakeCheckpointer()
    log_manager = LogManager(n_batches_per_epoch=2, log_writer=writer, checkpointer=checkpointer)
    assert log_manager.cleanup("model") == ("best", "model")
    assert checkpointer.calls == ["clear", "load_best_model"]
    assert writer.cleaned == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"counter_unit": "macaroni"}, "Unrecognized counter_unit"),
        ({"evaluation_freq": 0}, "evaluation_freq"),
        ({"config": {"counter_units": "points"}}, "unknown config key"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LogManager(n_batches_per_epoch=2, **kwargs)


def test_checkpointer_without_factor_is_rejected() -> None:
    with pytest.raises(ValueError, match="checkpoint_factor"):
        LogManager(n_batches_per_epoch=2, checkpointer=object())


def test_state_dict_round_trip_resumes_exactly() -> None:
    def run(log_manager: LogManager, n: int) -> list[tuple[bool, bool]]:
        return [_step(log_manager, 3) for _ in range(n)]

    settings = {"n_batches_per_epoch": 4, "counter_unit": "batches", "evaluation_freq": 3}
    reference = LogManager(**settings, checkpointer=FakeCheckpointer(2))
    expected = run(reference, 11)

    first = LogManager(**settings, checkpointer=FakeCheckpointer(2))
    head = run(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = LogManager(**settings, checkpointer=FakeCheckpointer(2))
    resumed.load_state_dict(state)
    assert head + run(resumed, 6) == expected
    assert resumed.state_dict() == reference.state_dict()


def test_load_state_dict_rejects_mismatch() -> None:
    state = LogManager(4, counter_unit="batches").state_dict()
    with pytest.raises(ValueError, match="config"):
        LogManager(4, counter_unit="points").load_state_dict(state)
    with pytest.raises(ValueError, match="n_batches_per_epoch"):
        LogManager(5, counter_unit="batches").load_state_dict(state)
    del state["batch_total"]
    with pytest.raises(ValueError, match="missing"):
        LogManager(4, counter_unit="batches").load_state_dict(state)


def test_close_after_failure_closes_both_and_never_raises(caplog) -> None:
    calls = []

    class BrokenWriter:
        def cleanup(self) -> None:
            calls.append("writer")
            raise OSError("disk full")

    class BrokenCheckpointer(FakeCheckpointer):
        def close(self) -> None:
            calls.append("checkpointer")
            raise RuntimeError("orbax failed")

    manager = LogManager(10, log_writer=BrokenWriter(), checkpointer=BrokenCheckpointer())
    with caplog.at_level("ERROR", logger="jaxmtl.training.log_manager"):
        manager.close_after_failure()
    assert calls == ["writer", "checkpointer"]
    assert [r.exc_info[1].args[0] for r in caplog.records] == ["disk full", "orbax failed"]
    LogManager(10).close_after_failure()  # nothing to close


def test_close_after_failed_resume_releases_without_writing() -> None:
    class Writer(FakeWriter):
        released = 0

        def release(self) -> None:
            self.released += 1

    writer = Writer()
    LogManager(10, log_writer=writer).close_after_failure(write_log=False)
    assert (writer.cleaned, writer.released) == (0, 1)
