"""Every family's tiny preset trains to the recorded losses (tests/golden/family_losses.json):
refactors must not change the numbers. Regenerate only after an intended numerical change with
``python tests/golden_losses.py --write`` and say why in the commit."""

import json

import pytest

import golden_losses as gl


# The cases that are some config file's plain tiny preset are checked in tests/test_train.py,
# where the case is itself a training the test needs (one training instead of two): dense by
# test_dense_config_files_tiny_preset_matches_its_golden_losses, moe, peer, memory and
# sparse_attn by test_bitwise_resume_every_family (its reference run). The rest are checked here.
HERE = sorted(set(gl.CASES) - {"dense", "moe", "peer", "memory", "sparse_attn"})


@pytest.mark.slow
@pytest.mark.parametrize("name", HERE)
def test_family_losses_match_golden(name, default_dataset, tmp_path):
  golden = json.loads(gl.GOLDEN.read_text())
  current = {name: gl.run_case(name, tmp_path)}
  assert not gl.compare(golden, current), gl.compare(golden, current)


def test_compare_flags_a_changed_loss():
  golden = {"x": {"loss": [1.0, 2.0], "eval_loss": 3.0}}
  assert gl.compare(golden, {"x": {"loss": [1.0, 2.0], "eval_loss": 3.0}}) == []
  diffs = gl.compare(golden, {"x": {"loss": [1.0, 2.001], "eval_loss": 3.0}})
  assert diffs == ["x: loss at step 2 2.001 differs from golden 2.0"]
