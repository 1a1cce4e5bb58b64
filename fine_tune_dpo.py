"""DPO-train the SFT response generator on a preference dataset: one 4-bit base model carrying the SFT adapter
twice (trainable "default" and TRL's frozen reference copy "ref"), so it fits one 24 GB GPU.

    python fine_tune_dpo.py --config args/dpo_arg.json
    python fine_tune_dpo.py --config args/dpo_arg.json --resume          # continue from the last checkpoint
    python fine_tune_dpo.py --config args/dpo_arg.json --set dpo.precompute_ref_log_probs=true   # low memory

precompute_ref_log_probs is the low-memory option: the reference log-probs are computed once, before training,
through the frozen "ref" adapter, so training steps skip the reference forward pass (whose logits otherwise add
to each step's peak memory) and about a third of the compute.

Several processes (TRL's own DDP path): accelerate launch --multi_gpu --num_processes 2 fine_tune_dpo.py --config ...
(or torchrun --nproc_per_node 2 ...; gloo on CPUs). Every process runs the reference guard; the main one writes.
The trained adapter lands in OUTPUT_DIR/final_adapter, ready for PeftModel.from_pretrained and evaluate.py.
"""

import argparse
import sys

from emotion_dpo.cli import add_config_arguments, run_main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "args/dpo_arg.json")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument("--preflight", action="store_true",
                        help="run this stage on a small slice in a scratch folder and project the whole run's time, "
                             "disk and GPU memory; writes nothing into output_dir (docs/preflight.md)")
    parser.add_argument("--preflight-keep", action="store_true", help="with --preflight: keep the scratch folder")
    args = parser.parse_args(argv)
    if args.preflight_keep and not args.preflight:
        parser.error("--preflight-keep goes with --preflight")
    if args.preflight and (args.resume):
        parser.error("--preflight runs the stage afresh on a slice; it goes with no other mode")

    def stages(cfg):
        if args.preflight:
            from emotion_dpo.preflight import stage_preflight

            stage_preflight("dpo", cfg, args.config, args.set, keep=args.preflight_keep)
            return
        from emotion_dpo.dpo_train import train

        train(cfg, resume=args.resume)

    run_main(args, "TrainConfig", stages, resume="run it again with --resume to continue from the last complete checkpoint")


if __name__ == "__main__":
    sys.exit(main())
