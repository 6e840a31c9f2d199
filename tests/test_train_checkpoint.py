"""Checkpoint bookkeeping without processes: which checkpoint resume picks, world-size check, rotation."""

import json

import pytest

from emoe_llm.train.checkpoint import find_resume_checkpoint, list_checkpoints, rotate_checkpoints


def make_ckpt(out, step, *, complete=True, world=2):
    d = out / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world}))
    return d


def test_auto_picks_latest_complete(tmp_path):
    assert find_resume_checkpoint("auto", tmp_path, world_size=2) is None
    make_ckpt(tmp_path, 4)
    good = make_ckpt(tmp_path, 8)
    make_ckpt(tmp_path, 12, complete=False)  # killed while saving: never resumed from
    assert find_resume_checkpoint("auto", tmp_path, world_size=2) == good
    assert find_resume_checkpoint("none", tmp_path, world_size=2) is None
    assert find_resume_checkpoint(str(tmp_path / "checkpoints" / "step_00000004"), tmp_path, world_size=2).name == \
        "step_00000004"
    with pytest.raises(FileNotFoundError, match="killed while saving"):
        find_resume_checkpoint(str(tmp_path / "checkpoints" / "step_00000012"), tmp_path, world_size=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_resume_checkpoint(str(tmp_path / "nope"), tmp_path, world_size=2)


def test_world_size_change_is_a_clear_error(tmp_path):
    make_ckpt(tmp_path, 4, world=16)
    with pytest.raises(RuntimeError, match="saved with 16 ranks but this run has 8"):
        find_resume_checkpoint("auto", tmp_path, world_size=8)


def test_rotation_keeps_last_k_and_drops_older_incomplete(tmp_path):
    for s in (2, 4, 6, 8):
        make_ckpt(tmp_path, s)
    make_ckpt(tmp_path, 5, complete=False)
    make_ckpt(tmp_path, 9, complete=False)  # newer than the kept ones: maybe being written, left alone
    removed = rotate_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_00000002", "step_00000004", "step_00000005"]
    assert [p.name for p in list_checkpoints(tmp_path, complete_only=False)] == \
        ["step_00000006", "step_00000008", "step_00000009"]
    assert rotate_checkpoints(tmp_path, keep_last=0) == []  # 0 = keep all
