"""Checkpoint glue of ``MetaGradCallback`` (private): states of older releases are migrated
where their layout maps onto today's, and refused with instructions where it does not."""

from __future__ import annotations

from typing import Any

from lightning_metagrad._validation import check_state_version

#: The state version release 0.1.0 wrote (a paper-only callback without predictors).
_V010_STATE_VERSION = 1
_RESUME_HINT = (
    "Start a new run (a new task stream) instead of resuming it: load its model weights only "
    "(`model.load_state_dict(torch.load(path)['state_dict'])`), or use the release that "
    "wrote it."
)


def refuse_unreadable_state(checkpoint: dict[str, Any], state_key: str, version: int) -> None:
    """``on_load_checkpoint``: Lightning gives a callback only the state stored under its own
    ``state_key`` and merely warns about the others. Release 0.1.0 keyed its state by other
    arguments, so without this check ``fit(ckpt_path=...)`` on a 0.1.0 checkpoint would resume
    the loops with a blank callback: every learned task silently lost."""
    states = checkpoint.get("callbacks") or {}
    if state_key in states:
        return  # load_state_dict checks its version
    for key, state in states.items():
        if not str(key).startswith("MetaGradCallback") or not isinstance(state, dict):
            continue
        found = state.get("version")
        if found == _V010_STATE_VERSION:
            raise ValueError(
                "The checkpoint holds MetaGradCallback state written by lightning-metagrad "
                f"0.1.0 (state version {found}, key {key!r}), which this release cannot "
                "resume: 0.1.0 had only the paper's meta-network predictor, in a layout "
                "today's predictors do not read. " + _RESUME_HINT
            )
        if found not in (version, 3):
            check_state_version("MetaGradCallback", state, version, _RESUME_HINT)


def migrate_state(state: dict[str, Any], version: int) -> dict[str, Any]:
    """The callback's state in today's layout (version 3 is migrated); ValueError naming the
    fix for a version this release cannot read."""
    if state.get("version") == 3:
        state = _from_version_3(state, version)
    check_state_version("MetaGradCallback", state, version, _RESUME_HINT)
    return state


def _from_version_3(state: dict[str, Any], version: int) -> dict[str, Any]:
    """The state layout before the engine owned the task lifecycle (version 3)."""
    engine = dict(state["engine"])
    engine.update(
        version=2,
        task_index=state["task_index"],
        num_tasks=state["tasks_started"],
        switch_pending=state["switch_pending"],
        switch_onset=state["switch_onset"],
        boundaries=state["boundaries"],
    )
    return {
        "version": version,
        "detected_switches": state["detected_switches"],
        "fit_done": state["fit_done"],
        "engine": engine,
        "diagnostics": state["diagnostics"],
    }
