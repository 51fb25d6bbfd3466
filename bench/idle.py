"""CPU the studio's server uses while idle: no browser, no request, for 20 s.

Once with the studio's queue settings (`studio.app.serve`), once with Gradio's defaults (its queue wakes
every millisecond), one after the other in this process; prints both and their ratio.

    python -m bench.idle
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import psutil


def idle_cpu_percent(*, studio_settings: bool, seconds: float) -> float:
    import launch
    from studio.app import serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app, _ = launch.build(launch.parse_args(["--device", "cpu", "--port", str(port)]))
    options = dict(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    if studio_settings:
        serve(app, **options)
    else:
        app.queue(default_concurrency_limit=1)
        app.launch(**options)
    try:
        time.sleep(2)  # start-up work done
        process = psutil.Process(os.getpid())
        before, started = process.cpu_times(), time.perf_counter()
        time.sleep(seconds)
        after, elapsed = process.cpu_times(), time.perf_counter() - started
        return 100 * ((after.user - before.user) + (after.system - before.system)) / elapsed
    finally:
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    studio = idle_cpu_percent(studio_settings=True, seconds=args.seconds)
    gradio_default = idle_cpu_percent(studio_settings=False, seconds=args.seconds)
    print(f"idle server, {args.seconds:.0f} s, no client: studio {studio:.2f}% of a core, "
          f"Gradio's defaults {gradio_default:.2f}%")
    print(f"studio / Gradio defaults = {studio / gradio_default:.2f}")


if __name__ == "__main__":
    main()
