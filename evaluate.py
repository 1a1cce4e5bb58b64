"""Does DPO make the response generator better? SFT vs DPO (and optionally the bare base), side by side.

    python evaluate.py --config args/evaluate_arg.json
    python evaluate.py --config args/demo/evaluate_arg.json --set dpo_adapter=outputs/demo/dpo/final_adapter

One reply per held-out prompt from each model, identical sampling settings and seeds, scored with
generate_preferences' classifiers and rewards. Writes results.md, results.json, replies.jsonl and
results.png to output_dir.
"""

import argparse
import sys

from emotion_dpo.cli import add_config_arguments, run_main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "args/evaluate_arg.json")
    args = parser.parse_args(argv)

    def stages(cfg):
        from emotion_dpo.evaluation import evaluate

        evaluate(cfg)

    run_main(args, "EvaluateConfig", stages)


if __name__ == "__main__":
    sys.exit(main())
