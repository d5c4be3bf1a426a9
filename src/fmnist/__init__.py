"""fmnist: train, understand, tune and serve Fashion-MNIST classifiers with PyTorch."""

__version__ = "0.1.0"


def main() -> int:
    """The `fmnist` command. Ctrl-C while the command-line module itself loads ends quietly too."""
    import signal
    import sys

    hit: list[int] = []
    old = signal.getsignal(signal.SIGINT)
    if old is not signal.SIG_IGN:  # see cli.interrupts_deferred
        signal.signal(signal.SIGINT, lambda sig, frame: hit.append(sig))
    try:
        from .cli import main as cli_main
    finally:
        signal.signal(signal.SIGINT, old)
    if hit:
        print("fmnist: interrupted", file=sys.stderr)
        return 130
    return cli_main()
