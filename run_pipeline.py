"""The whole job in one resumable command: generate_preferences -> fine_tune_dpo -> evaluate, in one run folder.

    python run_pipeline.py --config args/pipeline_arg.json
    python run_pipeline.py --config args/demo/pipeline_arg.json --set iterations=2 --set generate.num_prompts=64
    python run_pipeline.py --config ... --set dpo.dpo.beta=0.2 --set evaluate.include_base=false

--set reaches each stage's keys through its section (generate., dpo., evaluate.). With iterations K, iteration
k >= 2 samples new preference data from iteration k-1's DPO adapter (on prompts the earlier iterations did not use)
and trains on from it; every iteration is evaluated against SFT on the same held-out prompts (iterations.md).
Killed or interrupted, the same command resumes: finished stages are skipped, an unfinished one resumes itself.

--preflight runs iteration 1 on a small slice in a scratch folder next to output_dir (writing nothing into it), then
prints the projected time of each stage and of the whole job, the disk it needs and the peak GPU memory
(docs/preflight.md); --preflight-keep keeps the scratch folder.
"""

import argparse
import sys

from emotion_dpo.cli import add_config_arguments, run_main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "args/pipeline_arg.json")
    parser.add_argument("--preflight", action="store_true",
                        help="run iteration 1 on a small slice in a scratch folder and project the whole job's time, "
                             "disk and memory; writes nothing into output_dir")
    parser.add_argument("--preflight-keep", action="store_true", help="with --preflight: keep the scratch folder")
    args = parser.parse_args(argv)
    if args.preflight_keep and not args.preflight:
        parser.error("--preflight-keep goes with --preflight")

    def stages(cfg):
        if args.preflight:
            from emotion_dpo.preflight import preflight

            preflight(cfg, args.config, args.set, keep=args.preflight_keep)
            return
        from emotion_dpo.pipeline import run_pipeline

        run_pipeline(cfg)

    run_main(args, "PipelineConfig", stages)


if __name__ == "__main__":
    sys.exit(main())
