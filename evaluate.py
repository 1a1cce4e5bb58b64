"""Does DPO make the response generator better? SFT vs DPO (and optionally the bare base), side by side.

    python evaluate.py --config args/evaluate_arg.json
    python evaluate.py --config args/demo/evaluate_arg.json --set dpo_adapter=outputs/demo/dpo/final_adapter
    python evaluate.py --config ... --set dpo_adapter=demo_world/sft_adapter   # sanity: SFT vs itself ties
    python evaluate.py --config ... --fresh          # move earlier results in output_dir aside first
    accelerate launch --multi_gpu --num_processes 2 evaluate.py --config ...   # each process every 2nd batch

One reply per held-out prompt from each model, identical sampling settings and seeds, scored with
generate_preferences' classifiers and rewards. Writes results.md, results.json, replies.jsonl and
results.png (and the resolved config.json) to output_dir; wandb (offline by default) gets the table.
"""

import argparse
import sys

from emotion_dpo.cli import add_config_arguments, run_main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "args/evaluate_arg.json")
    parser.add_argument("--fresh", action="store_true", help="move earlier results in output_dir aside first")
    parser.add_argument("--preflight", action="store_true",
                        help="run this stage on a small slice in a scratch folder and project the whole run's time, "
                             "disk and GPU memory; writes nothing into output_dir (docs/preflight.md)")
    parser.add_argument("--preflight-keep", action="store_true", help="with --preflight: keep the scratch folder")
    args = parser.parse_args(argv)
    if args.preflight_keep and not args.preflight:
        parser.error("--preflight-keep goes with --preflight")
    if args.preflight and (args.fresh):
        parser.error("--preflight runs the stage afresh on a slice; it goes with no other mode")

    def stages(cfg):
        if args.preflight:
            from emotion_dpo.preflight import stage_preflight

            stage_preflight("evaluate", cfg, args.config, args.set, keep=args.preflight_keep)
            return
        from emotion_dpo.evaluation import evaluate

        evaluate(cfg, fresh=args.fresh)

    run_main(args, "EvaluateConfig", stages)


if __name__ == "__main__":
    sys.exit(main())
