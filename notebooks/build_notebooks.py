"""Writes the notebooks from these cell lists (keeps them reviewable as code; outputs are not committed)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

TRAIN = [
    new_markdown_cell("# Train and evaluate a router on synthetic routing logs\n\n"
                      "Runs in about a minute on a laptop CPU: a tiny backbone and synthetic logs, so that every "
                      "step (training, the artifact, its evaluation) is quick to see and runs anywhere, CI included. "
                      "A real router is trained on your own logs with the shipped recipe, `promptier train --config "
                      "default --logs ... --pool ...` (README, \"Train on your own logs\"); `classifier.load` and "
                      "the evaluation files below work the same on its artifact."),
    new_code_cell("from pathlib import Path\nimport tempfile\n\n"
                  "from training.synthetic import POOL_YAML, build_tiny_backbone, synthetic_rows, write_jsonl\n\n"
                  "work = Path(tempfile.mkdtemp(prefix='promptier-notebook-'))\n"
                  "LOGS = [write_jsonl(work / 'logs.jsonl', synthetic_rows(600))]\n"
                  "(work / 'pool.yaml').write_text(POOL_YAML)\n"
                  "POOL = work / 'pool.yaml'\n"
                  "BACKBONE = str(build_tiny_backbone(work / 'backbone'))\n"
                  "print(LOGS, POOL, BACKBONE)"),
    new_code_cell("from training.config import TrainConfig\nfrom training.pipeline import train\n\n"
                  "config = TrainConfig(backbone=BACKBONE, max_tokens=32, epochs=6, batch_size=16, learning_rate=3e-3,\n"
                  "                     freeze_embeddings=False, threads=2)\n"
                  "manifest = train(LOGS, POOL, work / 'model', config, model_version='notebook-1')\n"
                  "manifest.policy.thresholds"),
    new_markdown_cell("The artifact directory is the unit of deployment; `classifier.load` is the one way to open it."),
    new_code_cell("import classifier\n\nrouter = classifier.load(work / 'model')\n"
                  "for prompt in ['hello thanks say hi', 'prove the theorem about the integral']:\n"
                  "    print(router.classify(prompt))\n"
                  "assert router.classify('hello thanks say hi cat').tier == 'small'"),
    new_markdown_cell("## Cost-quality curve on the held-out split\n\nEach point is one threshold; the squares are "
                      "the single tiers, each over the prompts it has outcomes for (a source without a large model "
                      "leaves its prompts out of the large tier's square). Up and to the left is better."),
    new_code_cell("import json\nimport matplotlib.pyplot as plt\n\n"
                  "report = json.loads((work / 'model' / 'eval.json').read_text())\n"
                  "group = report['groups']['all']\n"
                  "fig, ax = plt.subplots(figsize=(6, 4))\n"
                  "for method, m in group['methods'].items():\n"
                  "    points = sorted(m['routing_curve'], key=lambda p: p['cost_usd'])\n"
                  "    ax.plot([p['cost_usd'] * 1000 for p in points], [p['quality'] for p in points], '.-', label=method)\n"
                  "for name, s in group['single_tiers'].items():\n"
                  "    ax.scatter(s['cost_usd'] * 1000, s['quality'], marker='s', color='black')\n"
                  "    ax.annotate(name, (s['cost_usd'] * 1000, s['quality']))\n"
                  "ax.set(xlabel='USD per 1k prompts', ylabel='mean quality'); ax.legend(); plt.show()"),
    new_code_cell("print((work / 'model' / 'eval.md').read_text())\n"
                  "assert group['methods']['promptier']['apgr'] > group['methods']['random']['apgr']"),
]

SERVE = [
    new_markdown_cell("# Call the gRPC routing service, the dispatcher, and read the decision log\n\n"
                      "Starts `promptier serve` on a free local port with a model artifact, calls it from Python the way "
                      "a gateway would, then sends OpenAI-SDK requests through `promptier dispatch` and reads its "
                      "decision log."),
    new_code_cell("import socket, subprocess, sys, tempfile, time\nfrom pathlib import Path\n\n"
                  "MODEL = None  # None: the default model shipped with the package\n"
                  "with socket.socket() as s:\n    s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]\n"
                  "command = [sys.executable, '-m', 'classifier.cli', 'serve', '--port', str(port)]\n"
                  "if MODEL: command += ['--model', str(MODEL)]\n"
                  "server = subprocess.Popen(command)\n"
                  "from serving.bench.ports import wait_serving\nwait_serving(f'127.0.0.1:{port}')"),
    new_code_cell("from serving.client import RouterClient\n\n"
                  "client = RouterClient(f'127.0.0.1:{port}', timeout=1.0)\ninfo = client.info()\n"
                  "print(info.model_version, [t.name for t in info.tiers], dict(info.mode_thresholds))"),
    new_code_cell("for prompt in ['What is the capital of France?',\n"
                  "               'Prove that every bounded monotone sequence of real numbers converges.']:\n"
                  "    decision = client.classify(prompt, mode='balanced')\n"
                  "    print(f'{decision.tier:>7}  {decision.server_latency_ms:.2f} ms  {prompt}')\n"
                  "# The latest turn is read first, then the turns before it: a short 'go ahead' is routed with the plan\n"
                  "# it approves.\n"
                  "plan = ('1. Partition the key space with consistent hashing into 256 virtual shards. 2. Replicate each '\n"
                  "        'shard on three nodes with Raft; the leader serves linearizable reads after a read-index round. '\n"
                  "        '3. Rebalance by streaming snapshots, then the log tail. 4. Clients cache the shard map.')\n"
                  "conversation = [('user', 'Design a sharded, replicated key-value store with linearizable reads.'),\n"
                  "                ('assistant', plan), ('user', 'ok, go ahead')]\n"
                  "print('conversation ->', client.classify(messages=conversation).tier)"),
    new_code_cell("batch = client.classify_batch(['hi', '', 'Summarise this contract clause by clause.'])\n"
                  "print(batch)  # one decision, or one error (its code and the reason), per item\n"
                  "import grpc\nassert batch[1] == grpc.StatusCode.INVALID_ARGUMENT"),
    new_markdown_cell("## Through the dispatcher, and the decision log\n\nA stand-in upstream (an OpenAI-compatible "
                      "server that answers at once) plays every tier here; in production each tier is vLLM, llama.cpp "
                      "server, Ollama or a hosted API. The official `openai` SDK talks to the dispatcher."),
    new_code_cell("import json, threading, uvicorn\nfrom serving.bench.dispatch_bench import echo_upstream\n\n"
                  "upstream = uvicorn.Server(uvicorn.Config(echo_upstream(), host='127.0.0.1', port=0, log_level='error'))\n"
                  "threading.Thread(target=upstream.run, daemon=True).start()\n"
                  "while not upstream.started:\n    time.sleep(0.05)\n"
                  "upstream_url = f'http://127.0.0.1:{upstream.servers[0].sockets[0].getsockname()[1]}/v1'\n"
                  "work = Path(tempfile.mkdtemp(prefix='promptier-dispatch-'))\n"
                  "config = {'classifier': {'address': f'127.0.0.1:{port}', 'timeout_ms': 200},\n"
                  "          'tiers': {t: {'base_url': upstream_url, 'model': f'{t}-model'} for t in ('small', 'medium', 'large')},\n"
                  "          'fallback_tier': 'large',\n"
                  "          'decision_log': {'path': str(work / 'decisions.jsonl'), 'store_prompts': True}}\n"
                  "(work / 'dispatcher.yaml').write_text(json.dumps(config))\n"
                  "with socket.socket() as s:\n    s.bind(('127.0.0.1', 0)); http_port = s.getsockname()[1]\n"
                  "dispatcher = subprocess.Popen([sys.executable, '-m', 'classifier.cli', 'dispatch', '--config',\n"
                  "                               str(work / 'dispatcher.yaml'), '--port', str(http_port)])\n"
                  "import httpx\nfor _ in range(100):\n    try:\n        httpx.get(f'http://127.0.0.1:{http_port}/health'); break\n"
                  "    except httpx.HTTPError:\n        time.sleep(0.2)"),
    new_code_cell("from openai import OpenAI\n\n"
                  "openai_client = OpenAI(base_url=f'http://127.0.0.1:{http_port}/v1', api_key='unused')\n"
                  "for prompt in ['What is the capital of France?', 'Prove that sqrt(2) is irrational.']:\n"
                  "    reply = openai_client.chat.completions.with_raw_response.create(\n"
                  "        model='promptier/balanced', messages=[{'role': 'user', 'content': prompt}])\n"
                  "    print(reply.headers['x-promptier-tier'], reply.headers['x-promptier-reason'], '|', prompt)"),
    new_code_cell("import pandas as pd\n\n"
                  "decisions = pd.read_json(work / 'decisions.jsonl', lines=True)\n"
                  "print(decisions[['tier', 'reason', 'model', 'confidence', 'classifier_ms', 'cost_usd', 'status']])\n"
                  "assert len(decisions) == 2 and (decisions['status'] == 200).all()"),
    new_code_cell("client.close()\nfor process in (dispatcher, server):\n    process.terminate(); process.wait(10)\n"
                  "upstream.should_exit = True"),
]


def main(folder: Path = HERE) -> None:
    """Write the notebooks into `folder`, byte for byte the same on every run."""
    for name, cells in (("01_train_and_evaluate.ipynb", TRAIN), ("02_grpc_service.ipynb", SERVE)):
        for index, cell in enumerate(cells):
            # nbformat draws each new cell a random id: fixed ones keep a rebuild from changing every cell.
            cell["id"] = f"{name[:2]}-{index:02d}"
        notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                      "language": "python"}})
        nbformat.write(notebook, folder / name)


if __name__ == "__main__":
    main()
