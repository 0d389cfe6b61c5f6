"""`make local`: the e2e control plane as a playground. Brings up etcd + kube-apiserver, the CRDs, the operator
(with the chart's RBAC), two engines serving the embedded tiny model, and a CoServingPool `llama-pool` of those
engines in the `default` namespace, with the files the examples name; then waits until Ctrl-C."""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path

from harness import ROOT, ControlPlane, OperatorProcess, byo_pool, install_crds, operator_kubeconfig, stop_all

sys.path.insert(0, str(ROOT / "tests"))

TOKEN = "local-engine-token"
DATASET = ROOT / "engine" / "data" / "demo_task.jsonl"
EXAMPLES = ("02-endpoint-base.yaml", "03-finetune-job.yaml", "04-endpoint-follows-job.yaml")   # 01 is GPU pods


def prepare_data(root: Path) -> Path:
    """The shared volume the examples expect: the model under models/, the support dataset under datasets/."""
    from coserve.engine.demo_model import write_tiny_model
    model = root / "models" / "llama-3.1-8b-instruct"
    if not (model / "config.json").is_file():
        write_tiny_model(model)
    (root / "datasets").mkdir(parents=True, exist_ok=True)
    shutil.copy(DATASET, root / "datasets" / "support.jsonl")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=ROOT / ".coserve-local",
                        help="state and logs (default: %(default)s)")
    args = parser.parse_args()
    from server_proc import EngineProcess

    work = args.dir.resolve()
    shutil.rmtree(work / "kube", ignore_errors=True)
    print(f"starting kube-apiserver and etcd (state and logs in {work}) ...", flush=True)
    plane = ControlPlane(work / "kube").start()
    engines: list = []
    operator = None
    try:
        install_crds(plane.admin_kubeconfig)
        model = prepare_data(work / "data")
        engines = [EngineProcess(model, work / "data", TOKEN, "--num-kv-blocks", "256") for _ in range(2)]
        operator = OperatorProcess(operator_kubeconfig(plane, work / "operator.kubeconfig"), work / "operator.log")
        operator.start()
        byo_pool(plane.admin_kubeconfig, "default", "llama-pool", TOKEN,
                 {f"engine-{i}": e.url for i, e in enumerate(engines)})
        examples = " ".join(f"-f examples/{n}" for n in EXAMPLES)
        print(f"""
ready. In another shell:
  export KUBECONFIG={plane.admin_kubeconfig} PATH={Path(sys.executable).parent}:$PATH
  kubectl apply {examples}
  kubectl get coserve
The pool `llama-pool` is two local engines (examples/01-pool.yaml describes GPU pods instead). Ctrl-C stops all.""",
              flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)   # even where a shell started us ignoring it
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_all([p.proc for p in (operator, *engines) if p is not None])
        plane.stop()


if __name__ == "__main__":
    main()
