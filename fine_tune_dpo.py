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
    args = parser.parse_args(argv)

    def stages(cfg):
        from emotion_dpo.dpo_train import train

        train(cfg, resume=args.resume)

    run_main(args, "TrainConfig", stages, resume="run it again with --resume to continue from the last complete checkpoint")


if __name__ == "__main__":
    sys.exit(main())
