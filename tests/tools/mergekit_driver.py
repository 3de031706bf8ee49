"""Run mergekit on a set of recipes, one process, one import (run with mergekit's Python).

    python mergekit_driver.py JOBS.json

JOBS.json: [{"recipe": path, "out": path}, ...]. Prints one JSON line per job with "ok" or
"error". Used by tests/test_mergekit_parity.py, which compares the outputs with mergecore's.
"""

import json
import sys
import traceback

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def main() -> int:
    jobs = json.load(open(sys.argv[1]))
    for job in jobs:
        try:
            cfg = MergeConfiguration.model_validate(yaml.safe_load(open(job["recipe"])))
            run_merge(cfg, job["out"], MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False,
                                                    random_seed=0, quiet=True))
            print(json.dumps({"recipe": job["recipe"], "ok": True}), flush=True)
        except Exception as err:  # report and go on with the next recipe
            print(json.dumps({"recipe": job["recipe"], "ok": False,
                              "error": f"{type(err).__name__}: {err}",
                              "trace": traceback.format_exc()[-1500:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
