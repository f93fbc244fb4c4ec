"""Pure unit tests of the migration state machine (no processes, no engine)."""

from __future__ import annotations

import pytest

from llumigrate.errors import ConfigError
from llumigrate.migration.protocol import Action, Migration, MigrationConfig, State


def make_migration(**kw) -> Migration:
    return Migration(MigrationConfig(**kw))


def run_to_precopy(m: Migration) -> None:
    assert m.next_action() is Action.RESERVE
    m.on_reserved()
    assert m.state is State.PRECOPY


def test_happy_path_stages_until_delta_small():
    m = make_migration(max_precopy_stages=5, stop_threshold_blocks=1)
    run_to_precopy(m)
    assert m.next_action(blocks_available=10) is Action.PRECOPY
    m.on_stage_done(10)
    # 3 new blocks since the last stage: more than the threshold
    assert m.next_action(blocks_available=13) is Action.PRECOPY
    m.on_stage_done(13)
    # 1 new block: stop-and-copy
    assert m.next_action(blocks_available=14) is Action.STOP
    m.on_stop_begin()
    assert m.state.source_stopped
    m.on_stopped()
    assert m.next_action() is Action.COMMIT
    m.on_committed()
    assert m.next_action() is Action.RELEASE
    m.on_released()
    assert m.state is State.DONE and m.next_action() is Action.NONE
    assert m.history == [State.RESERVING, State.PRECOPY, State.STOPPING, State.COMMITTING,
                         State.RELEASING]


def test_max_stages_forces_stop_even_if_delta_large():
    m = make_migration(max_precopy_stages=2, stop_threshold_blocks=0)
    run_to_precopy(m)
    for n in (10, 20):
        assert m.next_action(blocks_available=n) is Action.PRECOPY
        m.on_stage_done(n)
    assert m.next_action(blocks_available=100) is Action.STOP


def test_zero_stages_is_plain_stop_and_copy():
    m = make_migration(max_precopy_stages=0)
    run_to_precopy(m)
    assert m.next_action(blocks_available=50) is Action.STOP


def test_nothing_to_precopy_goes_straight_to_stop():
    m = make_migration()
    run_to_precopy(m)
    assert m.next_action(blocks_available=0) is Action.STOP


def test_first_stage_runs_even_when_below_threshold():
    m = make_migration(stop_threshold_blocks=4)
    run_to_precopy(m)
    assert m.next_action(blocks_available=2) is Action.PRECOPY


@pytest.mark.parametrize("state_events,expected_action,end_state", [
    ([], Action.CANCEL, State.ABORTED),                                   # during reserve
    (["on_reserved"], Action.CANCEL, State.ABORTED),                      # during pre-copy
    (["on_reserved", "on_stop_begin"], Action.RESUME_SOURCE, State.ROLLING_BACK),
    (["on_reserved", "on_stop_begin", "on_stopped"], Action.RESUME_SOURCE, State.ROLLING_BACK),
])
def test_failure_rollback_per_state(state_events, expected_action, end_state):
    m = make_migration()
    for ev in state_events:
        getattr(m, ev)()
    stage = m.state.value
    assert m.on_failure("boom") is expected_action
    assert m.state is end_state
    assert m.abort_reason == "boom" and m.abort_stage == stage
    if end_state is State.ROLLING_BACK:
        assert m.next_action() is Action.RESUME_SOURCE
        m.on_resumed()
        assert m.state is State.ABORTED


def test_failure_after_commit_is_not_an_abort():
    m = make_migration()
    for event in (m.on_reserved, m.on_stop_begin, m.on_stopped, m.on_committed):
        event()
    assert m.on_failure("release lost") is Action.NONE
    assert m.state is State.DONE and m.abort_reason == ""


def test_failure_in_terminal_state_is_ignored_and_first_reason_kept():
    m = make_migration()
    m.on_failure("first")
    assert m.on_failure("second") is Action.NONE
    assert m.abort_reason == "first"


def test_source_finished_during_precopy_cancels():
    m = make_migration()
    m.on_reserved()
    assert m.on_source_finished() is Action.CANCEL
    assert m.state is State.ABORTED and "finished" in m.abort_reason


def test_source_finished_after_stop_is_not_a_cancel():
    m = make_migration()
    m.on_reserved()
    m.on_stop_begin()
    assert m.on_source_finished() is Action.NONE
    assert m.state is State.STOPPING


def test_out_of_order_event_raises():
    m = make_migration()
    with pytest.raises(RuntimeError, match="reserving"):
        m.on_stopped()


def test_every_live_state_has_a_deadline():
    m = make_migration(stage_timeout_s=7.5)
    seen = {}
    for event in (m.on_reserved, m.on_stop_begin, m.on_stopped, m.on_committed, None):
        seen[m.state] = m.timeout_for()
        if event is not None:
            event()
    assert all(v > 0 for v in seen.values())
    assert seen[State.PRECOPY] == 7.5


@pytest.mark.parametrize("kw", [{"max_precopy_stages": -1}, {"stop_threshold_blocks": -2},
                                {"stage_timeout_s": 0}, {"commit_timeout_s": -1.0}])
def test_config_validation(kw):
    with pytest.raises(ConfigError):
        MigrationConfig(**kw)


def test_finished_before_stop_ends_aborted_with_nothing_to_resume():
    m = make_migration()
    m.on_reserved()
    m.on_stop_begin()
    m.on_finished_before_stop()
    assert m.state is State.ABORTED and m.next_action() is Action.NONE
    assert m.abort_stage == "stopping" and "finished" in m.abort_reason
