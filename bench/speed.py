"""Speed and memory of the device path, beside the floor (bare invoke) and TensorFlow float Keras.

    python bench/speed.py --bundle BUNDLE [--frames 200] [--threads 1 2]

Every measurement runs in a fresh process on real MVTec screw pictures resized to 640x480 camera frames:
- bare ``interpreter.invoke()`` of the bundle's model (the floor: nothing the agent adds);
- the agent's per-frame work (``Scorer.score``: preprocess + invoke + cosine against the bank + verdict);
- the full loop with an MQTT QoS 1 publish to a local mosquitto (waits for PUBACK, as the outbox does);
- the float Keras MobileNetV2 embedder of the same size run with TensorFlow on the same frames;
plus the agent process's peak RSS, its import time and the bundle's size on disk.
Writes bench/results/speed.json and bench/results/speed.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from bench._common import RESULTS, SHARED, machine, md_table, percentiles, real_frames, run_worker

HERE = Path(__file__).resolve()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker_agent(bundle: str, threads: int, n: int, mqtt_port: int | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    from agent.bundle import load_bundle
    from agent.scoring import Scorer

    import_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    b = load_bundle(bundle, num_threads=threads)
    load_s = time.perf_counter() - t1
    scorer = Scorer(b)
    frames = real_frames(n)
    for f in frames[:10]:
        scorer.score(f)

    # The floor: the same model, input already quantised and in place, invoke() alone.
    from agent.preprocess import preprocess

    b.model.set_input(preprocess(frames[0], b.preprocessing))
    bare = []
    for _ in range(n):
        s = time.perf_counter()
        b.model.invoke()
        bare.append((time.perf_counter() - s) * 1000)

    work = []
    for f in frames:
        s = time.perf_counter()
        scorer.score(f)
        work.append((time.perf_counter() - s) * 1000)

    out: dict[str, Any] = {
        "bare_invoke": percentiles(bare),
        "agent_work": percentiles(work),
        "import_s": import_s,
        "bundle_load_s": load_s,
        "runtime": b.model.runtime,
    }
    if mqtt_port:
        out["full_loop_mqtt"] = percentiles(_mqtt_loop(scorer, frames, b, mqtt_port))
    out["peak_rss_mb"] = _rss_mb()
    return out


def _mqtt_loop(scorer: Any, frames: list, bundle: Any, port: int) -> list[float]:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="yugami-bench")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        from agent import mqtt as agent_mqtt  # the agent's own payload builder, when present
    except ImportError:
        agent_mqtt = None
    times = []
    for i, f in enumerate(frames):
        s = time.perf_counter()
        result, _ = scorer.score(f)
        payload = json.dumps({"v": 1, "id": f"bench-{i}", "device": "bench", **result.as_dict(),
                              "model": {"name": bundle.name, "sha256": bundle.manifest_sha256}})
        info = client.publish("yugami/bench/verdict", payload, qos=1)
        info.wait_for_publish(timeout=10)
        times.append((time.perf_counter() - s) * 1000)
    client.loop_stop()
    client.disconnect()
    del agent_mqtt
    return times


def service_run(bundle: str, threads: int, n: int, port: int) -> dict[str, Any]:
    """The real ``yugami-agent`` on a 640x480 video of real frames: its frames/s end to end (verdicts as a
    subscriber receives them) and its peak RSS (VmHWM) read from /proc."""
    import cv2
    import paho.mqtt.client as mqtt
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="yugami-bench-"))
    video = tmp / "frames.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
    for f in real_frames(n):
        writer.write(f)
    writer.release()
    config = {
        "device_id": "bench", "bundle": str(Path(bundle).resolve()), "threads": threads,
        "capture": {"source": str(video)}, "mqtt": {"host": "127.0.0.1", "port": port},
        "storage": {"dir": str(tmp / "state")}, "service": {"log_level": "warning"},
    }
    (tmp / "agent.yaml").write_text(yaml.safe_dump(config))
    arrivals: list[float] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="yugami-bench-sub")
    sub.on_message = lambda c, u, m: arrivals.append(time.perf_counter())
    sub.connect("127.0.0.1", port)
    sub.subscribe("yugami/bench/verdict", qos=1)
    sub.loop_start()
    proc = subprocess.Popen([sys.executable, "-m", "agent.service", "--config", str(tmp / "agent.yaml")],
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(arrivals) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    status = Path(f"/proc/{proc.pid}/status").read_text() if proc.poll() is None else ""
    hwm = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM")), float("nan"))
    proc.terminate()
    proc.wait(30)
    sub.loop_stop()
    shutil.rmtree(tmp, ignore_errors=True)
    if len(arrivals) < n:
        raise RuntimeError(f"the agent delivered {len(arrivals)} of {n} verdicts")
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return {"service_loop": percentiles(gaps), "service_peak_rss_mb": hwm}


def worker_keras(bundle: str, threads: int, n: int) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from agent.bundle import load_bundle
    from agent.preprocess import preprocess

    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    pre = load_bundle(bundle).preprocessing
    h, w = pre.input_size
    alpha = float(manifest.get("training", {}).get("alpha", 1.0))
    weights = SHARED / "weights/mobilenet_v2_1.0_224_no_top.h5"
    # The bundle's own embedder in float Keras (pooling as the bundle's manifest says): what a user
    # without the int8 export would run.
    from trainer.model import ModelConfig, build_embedder, export_model

    pooling = "gem" if (manifest.get("embedding") or {}).get("pooling") == "gem" else "avg"
    # A bundle that scores patches: the float model also runs the patch trunk (the search is not timed)
    cfg = ModelConfig(input_size=(h, w), alpha=alpha, pooling=pooling, patch="patch" in manifest,
                      weights=str(weights) if alpha == 1.0 and weights.is_file() else "none")
    embedder, _ = build_embedder(cfg)
    model = export_model(embedder, cfg) if cfg.patch else embedder
    frames = real_frames(n)
    for f in frames[:5]:
        model(preprocess(f, pre)[None], training=False)
    times = []
    for f in frames:
        s = time.perf_counter()
        outputs = model(preprocess(f, pre)[None], training=False)
        [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
        times.append((time.perf_counter() - s) * 1000)
    return {"keras_float": percentiles(times), "peak_rss_mb": _rss_mb()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_mosquitto() -> tuple[subprocess.Popen | None, int | None, Path | None]:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not exe:
        return None, None, None
    port = _free_port()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "m.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(tmp / "m.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port, tmp
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None, None, tmp


def bundle_size(bundle: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(bundle.iterdir()) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-keras", action="store_true", help="skip the TensorFlow float baseline")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    parser.add_argument("--worker", choices=["agent", "keras"], help=argparse.SUPPRESS)
    parser.add_argument("--mqtt-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "agent":
        print(json.dumps(worker_agent(str(args.bundle), args.threads[0], args.frames, args.mqtt_port)))
        return
    if args.worker == "keras":
        print(json.dumps(worker_keras(str(args.bundle), args.threads[0], args.frames)))
        return

    broker, port, _ = _start_mosquitto()
    results: dict[str, Any] = {"machine": machine(), "bundle": str(args.bundle), "frames": args.frames,
                               "bundle_bytes": bundle_size(args.bundle), "threads": {}}
    try:
        for t in args.threads:
            print(f"threads={t}: agent ...", file=sys.stderr, flush=True)
            extra = ["--mqtt-port", str(port)] if port else []
            r = run_worker(HERE, ["--worker", "agent", "--bundle", str(args.bundle), "--threads", str(t),
                                  "--frames", str(args.frames), *extra])
            if port:
                print(f"threads={t}: yugami-agent service ...", file=sys.stderr, flush=True)
                r.update(service_run(str(args.bundle), t, args.frames, port))
            if not args.no_keras:
                print(f"threads={t}: keras float ...", file=sys.stderr, flush=True)
                r["keras"] = run_worker(HERE, ["--worker", "keras", "--bundle", str(args.bundle),
                                               "--threads", str(t), "--frames", str(args.frames)])
            results["threads"][str(t)] = r
    finally:
        if broker:
            broker.terminate()
            broker.wait(5)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    md = render(results)
    args.out.with_suffix(".md").write_text(md)
    print(md)


def render(r: dict[str, Any]) -> str:
    rows = []
    for t, x in r["threads"].items():
        for key, label in [("bare_invoke", "bare invoke() (floor)"), ("agent_work", "agent per-frame work"),
                           ("full_loop_mqtt", "scorer + MQTT QoS1 publish (in-process)"),
                           ("service_loop", "yugami-agent service, video -> verdict received")]:
            if key in x:
                rows.append([t, label, x[key]["p50_ms"], x[key]["p99_ms"], x[key]["fps"]])
        if "keras" in x:
            k = x["keras"]["keras_float"]
            rows.append([t, "TensorFlow float Keras", k["p50_ms"], k["p99_ms"], k["fps"]])
    lines = [
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, Python {r['machine']['python']}, "
        f"{r['machine']['date']}. {r['frames']} real screw frames at 640x480. Bundle `{r['bundle']}`.",
        "",
        md_table(["threads", "path", "p50 ms", "p99 ms", "frames/s"], rows),
        "",
    ]
    ratios = []
    for t, x in r["threads"].items():
        ratio = x["agent_work"]["mean_ms"] / x["bare_invoke"]["mean_ms"]
        line = f"- threads={t}: agent work / bare invoke = {ratio:.2f}x (target <= 1.5x)"
        if "keras" in x:
            line += (f"; agent frames/s / TensorFlow float frames/s = "
                     f"{x['agent_work']['fps'] / x['keras']['keras_float']['fps']:.1f}x (target >= 20x)")
        ratios.append(line)
        if "service_peak_rss_mb" in x:
            rss = x['service_peak_rss_mb']
            ratios.append(f"  yugami-agent service peak RSS (VmHWM) {rss:.0f} MB (target < 150 MB)")
        ratios.append(f"  benchmark worker peak RSS {x['peak_rss_mb']:.0f} MB, import {x['import_s']:.2f} s, "
                      f"bundle load {x['bundle_load_s']:.2f} s, runtime {x['runtime']}"
                      + (f"; TensorFlow process peak RSS {x['keras']['peak_rss_mb']:.0f} MB" if "keras" in x else ""))
    total = sum(r["bundle_bytes"].values())
    sizes = ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in r["bundle_bytes"].items())
    lines += [*ratios, f"- bundle size {total / 1024 / 1024:.2f} MiB (target < 8 MiB): {sizes}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
