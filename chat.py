"""Talk to the SFT and the DPO model side by side: one base model carrying both adapters, each reply shown with its
classifier labels and reward parts. Reads standard input, so it works piped too.

    python chat.py --config args/demo/evaluate_arg.json --set dpo_adapter=outputs/demo/pipeline/iter-2/dpo/final_adapter
    printf 'hello there\\n/emotion happiness\\nhow are you ?\\n' | python chat.py --config ...

Commands: /emotion NAME (the emotion both models are asked to reply in), /emotion, /reset, /help, /quit.
The config is evaluate's: models, adapter and dpo_adapter, template, system_prompt, num_turns_history (the history
each model sees), classifiers, reward settings and sampling settings.
"""

import argparse
import sys

from emotion_dpo.cli import add_config_arguments, run_main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, "args/evaluate_arg.json")
    parser.add_argument("--show-prompts", action="store_true", help="print each model's prompt as it sees it")
    args = parser.parse_args(argv)

    def stages(cfg):
        from emotion_dpo.chat import chat

        chat(cfg, sys.stdin, show_prompts=args.show_prompts)

    run_main(args, "EvaluateConfig", stages)


if __name__ == "__main__":
    sys.exit(main())
