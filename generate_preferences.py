"""Sample, score and select chosen/rejected reply pairs: a TRL-style preference dataset.

    python generate_preferences.py --config args/generate_preferences_arg.json
    python generate_preferences.py --config args/demo/generate_preferences_arg.json --set num_prompts=64
    python generate_preferences.py --config ... --finalize          # dataset from the journal so far
    python generate_preferences.py --config ... --reselect OUT_DIR --set reward_weights=[0.6,0.1,0.3]

Killed or interrupted, the same command resumes where it stopped. Several GPUs:
    accelerate launch --num_processes 2 generate_preferences.py --config ...
"""

import argparse
import sys

from emotion_dpo.cli import add_config_arguments, run_main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "args/generate_preferences_arg.json")
    parser.add_argument("--fresh", action="store_true", help="move an earlier run in output_dir aside and start over")
    parser.add_argument("--finalize", action="store_true", help="only build the dataset from the journal so far")
    parser.add_argument("--reselect", metavar="OUT_DIR", help="re-score stored candidates into a new dataset folder")
    parser.add_argument("--preflight", action="store_true",
                        help="run this stage on a small slice in a scratch folder and project the whole run's time, "
                             "disk and GPU memory; writes nothing into output_dir (docs/preflight.md)")
    parser.add_argument("--preflight-keep", action="store_true", help="with --preflight: keep the scratch folder")
    args = parser.parse_args(argv)
    if args.preflight_keep and not args.preflight:
        parser.error("--preflight-keep goes with --preflight")
    if args.preflight and (args.fresh or args.finalize or args.reselect):
        parser.error("--preflight runs the stage afresh on a slice; it goes with no other mode")

    def stages(cfg):
        if args.preflight:
            from emotion_dpo.preflight import stage_preflight

            stage_preflight("generate", cfg, args.config, args.set, keep=args.preflight_keep)
            return
        from emotion_dpo import generate

        if args.reselect:
            generate.reselect_run(cfg, args.reselect)
        elif args.finalize:
            generate.finalize_run(cfg)
        else:
            generate.generate(cfg, fresh=args.fresh)

    run_main(args, "GenerateConfig", stages)


if __name__ == "__main__":
    sys.exit(main())
