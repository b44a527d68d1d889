"""Forgetting, retention and average incremental AP of a run, from its per-stage per-class AP.

For every per-class metric M of results.json (AP50 is the primary one; AP and,
on VOC datasets, VOC07_AP50 and VOC_AREA_AP50 too), at stage k with old classes O_k::

    F_c(k)       = max_{t < k, c seen at t} M_c(t) - M_c(k)        forgetting of class c
    forgetting_M = mean_{c in O_k} F_c(k)
    retention_M  = mean_{c in O_k} M_c(k) / mean_{c in O_k} M_c(k - 1)
                   i.e. AP_old(k) / AP_old(teacher): the teacher is the model of stage k - 1
    average_incremental_M = mean_k M(k)                             (M = AP over all seen classes)

Classes without test objects (M_c NaN / null) are left out of the means, and a
retention's two means run over the classes with a number at both stages. F_c needs
c at an earlier stage of the results and retention the stage k - 1 itself: stage 0
has neither (null); a re-evaluation of some stages (``--stages 0,2``) measures
forgetting from the stages it holds and has no retention where k - 1 is missing.
"""
import math

import numpy as np

__all__ = ["add_forgetting", "per_class_metrics"]


def _number(value):
    return value is not None and not math.isnan(value)


def _mean(values):
    values = [v for v in values if _number(v)]
    return float(np.mean(values)) if values else None


def per_class_metrics(results):
    """The per-class metric names of a run (AP, AP50, ...), in their results.json order."""
    names = {}
    for entry in results["stages"]:
        for scores in entry["per_class"].values():
            names.update(dict.fromkeys(scores))
    return list(names)


def _stage_forgetting(entry, earlier, metrics):
    """The forgetting and retention keys of one stage entry, given the entries before it."""
    old = entry["old_classes"]
    per_class = {}
    for name in old:
        history = {m: [e["per_class"][name].get(m) for e in earlier if name in e["per_class"]] for m in metrics}
        current = entry["per_class"].get(name, {})
        per_class[name] = {
            m: (max(v for v in history[m] if _number(v)) - current[m])
            if _number(current.get(m)) and any(_number(v) for v in history[m])
            else None
            for m in metrics
        }
    keys = {"forgetting_per_class": per_class}
    teacher = earlier[-1] if earlier and earlier[-1]["stage"] == entry["stage"] - 1 else None
    for m in metrics:
        keys[f"forgetting_{m}"] = _mean(per_class[c][m] for c in old) if old else None
        pairs = []
        if teacher is not None:
            pairs = [
                (entry["per_class"][c][m], teacher["per_class"][c][m])
                for c in old
                if _number(entry["per_class"].get(c, {}).get(m)) and _number(teacher["per_class"].get(c, {}).get(m))
            ]
        teacher_ap = _mean(t for _, t in pairs)
        keys[f"{m}_old_teacher"] = teacher_ap
        keys[f"retention_{m}"] = _mean(s for s, _ in pairs) / teacher_ap if teacher_ap else None
    return keys


def add_forgetting(results):
    """``results`` (a results.json dict) with forgetting keys in every stage entry and a run-level ``summary``.

    Stage keys, for each metric M: ``forgetting_M``, ``retention_M``, ``M_old_teacher``
    and ``forgetting_per_class`` {old class: {M: F_c}}. ``summary``: the number of
    stages, the last stage's index, and per metric ``average_incremental_M``,
    ``final_M`` / ``final_M_old`` / ``final_M_new``, ``final_forgetting_M``, ``final_retention_M``.
    """
    metrics = per_class_metrics(results)
    stages = [dict(entry) for entry in results["stages"]]
    for k, entry in enumerate(stages):
        entry.update(_stage_forgetting(entry, stages[:k], metrics))
    summary = {"num_stages": len(stages), "final_stage": stages[-1]["stage"] if stages else None}
    for m in metrics:
        summary[f"average_incremental_{m}"] = _mean(e.get(m) for e in stages)
        final = stages[-1] if stages else {}
        for key in (m, f"{m}_old", f"{m}_new", f"forgetting_{m}", f"retention_{m}"):
            summary[f"final_{key}"] = final.get(key)
    return {**results, "stages": stages, "summary": summary}
