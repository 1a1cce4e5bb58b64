"""DPO alignment pipeline for an emotion-aware chatbot's response generator."""

# The seven DailyDialog emotions, in the label order the reference classifier uses.
EMOTIONS = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")


def _quiet_optional_bitsandbytes_kernel() -> None:
    """bitsandbytes 0.50, on a CPU with AVX512-BF16, tries at import to fetch an optional faster 4-bit kernel from the
    Hub (`kernels-community`) and logs a warning when it cannot: noise on every script's output (the `kernels`
    package is not installed, and no Hub is reachable offline); the 4-bit path works without it."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage())


_quiet_optional_bitsandbytes_kernel()
