"""A suite's records (``benchmarks/results/SUITE_SIZE.json``): loaded, merged, saved.

A record is one run's numbers (the speed suite: one measurement of all its runs).
Its key is the suite, spec, variant, seed and protocol; a new record replaces the
one of the same key and every other record is kept, so ``--specs 19+1`` leaves
the 10+10 records in place.
"""
import json
import os

from ilmil.file_io import atomic_write

# What makes two runs of a spec, variant and seed comparable: the budget
# ("STAGE0+LATER" iterations), the data size and the command line's overrides.
PROTOCOL_FIELDS = ("budget", "num_train", "num_test", "extra_opts")
KEY_FIELDS = ("suite", "spec", "variant", "seed", *PROTOCOL_FIELDS)


def record_key(record):
    return json.dumps([record.get(field) for field in KEY_FIELDS])


class RecordsError(ValueError):
    """A records file that cannot be read; the message names it and the fix."""


def load(path):
    """The records of ``path``, or [] when there is none yet."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            return json.load(f)["records"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecordsError(f"{path} is not a records file ({type(e).__name__}: {e}); fix: restore it "
                           f"(git checkout -- {path}) or move it aside and re-run the suite, which reuses "
                           "its finished runs") from None


def merge(old, new):
    """``old`` with each record of ``new`` in place of the old one of its key, the rest appended."""
    fresh = {record_key(r): r for r in new}
    merged = [fresh.pop(record_key(r), r) for r in old]
    return merged + [r for r in new if record_key(r) in fresh]


def save(path, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: json.dump({"records": records}, f, indent=2), mode="w")
