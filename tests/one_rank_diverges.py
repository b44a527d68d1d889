"""tools/train_incremental.py with detectron2's non-finite-proposals error raised on
rank 1 only, in its second training forward pass (what one process's diverged
proposals look like), for the torchrun test of tests/test_distributed.py."""
import os
import runpy
import sys

import ilmil  # noqa: F401  (detectron2 compatibility adjustments come first)
from detectron2.modeling.proposal_generator import rpn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_find_top_rpn_proposals = rpn.find_top_rpn_proposals
_training_calls = []


def _diverging_on_rank_1(*args, **kwargs):
    if args[-1] and os.environ.get("RANK") == "1":  # the last argument: training
        _training_calls.append(1)
        if len(_training_calls) == 2:
            raise FloatingPointError("Predicted boxes or scores contain Inf/NaN. Training has diverged.")
    return _find_top_rpn_proposals(*args, **kwargs)


rpn.find_top_rpn_proposals = _diverging_on_rank_1
sys.argv = [os.path.join(REPO_ROOT, "tools", "train_incremental.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
