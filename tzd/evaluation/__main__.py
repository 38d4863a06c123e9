"""python -m tzd.evaluation: lm-eval's own CLI, unchanged, with the `tzd` model registered.

    python -m tzd.evaluation --model tzd --model_args pretrained=models/addition-small \
        --include_path tzd/evaluation/tasks --tasks tzd_addition --batch_size 16
"""

from lm_eval.__main__ import cli_evaluate

import tzd.evaluation  # noqa: F401 - registers the tzd model

if __name__ == "__main__":
    cli_evaluate()
