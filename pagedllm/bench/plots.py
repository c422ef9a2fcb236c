"""Simple matplotlib (Agg) bar charts written next to the JSON results."""

from pathlib import Path

from pagedllm.bench.results import output_file


def bar_chart(path: str | Path, labels: list[str], values: list[float], title: str, ylabel: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    path = output_file(path, ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(labels) + 1), 3.6))
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#7f7f7f"]
    bars = ax.bar(range(len(values)), values, color=[colors[i % len(colors)] for i in range(len(values))])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:,.0f}" if v >= 10 else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
        ylabel += " (log scale)"
        ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def throughput_plot(result: dict, output: str) -> Path | None:
    labels, values = ["pagedllm"], [result["output_tokens_per_s"]]
    for name, entry in result.get("baselines", {}).items():
        if isinstance(entry, dict) and entry.get("output_tokens_per_s"):
            labels.append(name)
            values.append(entry["output_tokens_per_s"])
    if result.get("ideal_output_tokens_per_s"):
        labels.append("roofline ideal")
        values.append(result["ideal_output_tokens_per_s"])
    title = f"{result.get('workload')} workload, {result.get('model')} {result.get('dtype')}\n{result.get('device')}"
    return bar_chart(output, labels, values, title, "output tokens/s")


def prefix_plot(result: dict, output: str) -> Path | None:
    labels = ["caching on", "caching off"]
    values = [result["on"]["output_tokens_per_s"], result["off"]["output_tokens_per_s"]]
    title = (f"prefix workload: {result['speedup']:.2f}x, hit rate {result['on']['hit_rate']:.0%}\n"
             f"{result.get('device')}")
    return bar_chart(output, labels, values, title, "output tokens/s")


def latency_plot(result: dict, output: str) -> Path | None:
    labels = ["TTFT (ms)", "TPOT (ms)"]
    values = [result["ttft_ms"], result["tpot_ms"] or 0.0]
    if result.get("ideal_tpot_ms"):
        labels.append("ideal TPOT (ms)")
        values.append(result["ideal_tpot_ms"])
    return bar_chart(output, labels, values, f"latency, batch 1\n{result.get('device')}", "ms")


def serve_vs_offline_plot(result: dict, output: str) -> Path | None:
    labels, values = ["offline"], [result["offline"]["output_tokens_per_s"]]
    for count, runs in result["served"].items():
        for name in ("stream", "no_stream", "stream_openai"):
            labels.append(f"{name.replace('_', ' ')}\n{count} API proc")
            values.append(runs[name]["output_throughput"])
    title = f"nano workload through the server vs offline, {result.get('model')}\n{result.get('device')}"
    return bar_chart(output, labels, values, title, "output tokens/s")


def plot_json(path: str | Path) -> Path | None:
    """Re-draw the PNG of a saved result (e.g. on a machine that has matplotlib)."""
    import json
    path = Path(path)
    result = json.loads(path.read_text())
    kind = result.get("benchmark")
    fn = {"throughput": throughput_plot, "prefix": prefix_plot, "latency": latency_plot,
          "serve_vs_offline": serve_vs_offline_plot}.get(kind)
    if fn is None or (kind == "throughput" and not isinstance(result.get("baselines", {}), dict)):
        print(f"{path}: nothing to plot")
        return None
    return fn(result, str(path.with_suffix("")))


if __name__ == "__main__":
    import sys
    for arg in sys.argv[1:]:
        plot_json(arg)
