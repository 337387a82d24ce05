"""The soak's verdict: headline figures and bars from the raw counts, the table and the failure timeline."""

from __future__ import annotations

from collections import Counter

from serving.bench.soak_processes import LABEL_NICENESS, LOAD_NICENESS

# The bars a run must hold for exit code 0.
WELL_BEHAVED_BAR_PCT = 99.0
PAID_DELIVERED_BAR_PCT = 100.0
TIMELINE_BIN_S = 10  # the printed timeline of failures counts them per this many seconds


def pct(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole else None


def summarize(raw: dict) -> dict:
    """The report: the raw counts of `run_soak` under `details`, the headline figures, the bars and
    whether they held (`passed`)."""
    traffic = raw["traffic"]
    well = traffic["well_behaved"]
    well_ok = well.get("outcomes", {}).get("OK", 0)
    well_calls = sum(well.get("outcomes", {}).values())
    flood = traffic["flood"]
    flood_outcomes = flood.get("outcomes", {})
    flood_calls = sum(flood_outcomes.values())
    refused = flood_outcomes.get("RESOURCE_EXHAUSTED", 0)
    dispatch = traffic["dispatch"]
    intact = set(dispatch.get("intact_ids", []))
    paid_list = raw["upstream"].get("paid", [])
    paid = set(paid_list)
    delivered = len(paid & intact)
    dispatch_outcomes = dispatch.get("outcomes", {})
    rounds = raw["label_rounds"]
    logs = raw["logs"]
    crashes = {
        "serve_exited_early": int(raw["serve_exited_early"] is not None),
        "dispatcher_exited_early": int(raw["dispatch_exited_early"] is not None),
        "serve_stopped_uncleanly": int(raw["serve_exited_early"] is None and raw["serve_stop_exit_code"] != 0),
        "dispatcher_stopped_uncleanly": int(raw["dispatch_exited_early"] is None
                                            and raw["dispatch_stop_exit_code"] != 0),
        "serve_tracebacks": logs["serve_tracebacks"],
        "dispatcher_tracebacks": logs["dispatch_tracebacks"],
        "serve_workers_died_unexpectedly": logs["serve_unexpected_worker_deaths"],
        "dispatcher_workers_died": logs["dispatch_worker_deaths"],
    }
    chaos = raw["chaos"]
    figures = {
        # The bar is over the calls the client sent: one its process was too starved to send on time
        # (`not_sent`, shown beside it) never reached the service, which it measures.
        "well_behaved": {"calls": well_calls, "served": well_ok, "served_pct": pct(well_ok, well_calls),
                         "not_sent": well.get("not_sent", 0),
                         "deadline_ms": well.get("deadline_ms"), "p50_ms": well.get("p50_ms"),
                         "p99_ms": well.get("p99_ms"), "by_status": well.get("outcomes", {}),
                         "answered_but_seen_late": well.get("answered_but_seen_late"),
                         "server_held": well.get("server_held"), "client_loop_lag": well.get("client_loop_lag"),
                         "client_loop_lags_over_deadline": well.get("client_loop_lags_over_deadline"),
                         "failures_by_second": well.get("failures_by_second")},
        "flood": {"calls": flood_calls, "refused_resource_exhausted": refused,
                  "refused_pct": pct(refused, flood_calls), "by_status": flood_outcomes,
                  "calls_per_s": flood.get("calls_per_s"), "prompts_per_call": flood.get("batch"),
                  "not_sent": flood.get("not_sent"), "load_generators_niceness": LOAD_NICENESS,
                  "capacity_prompts_per_s": raw["capacity"]["prompts_per_s"]},
        "dispatcher": {"requests": sum(dispatch_outcomes.values()), "not_sent": dispatch.get("not_sent", 0),
                       "by_outcome": dispatch_outcomes,
                       "paid_answers": len(paid), "paid_delivered_intact": delivered,
                       "paid_delivered_pct": pct(delivered, len(paid)),
                       "paid_twice": len(paid_list) - len(paid), "intact_but_never_paid": len(intact - paid),
                       "upstream_answers": raw["upstream"].get("answers", {}),
                       "routing_reasons": dispatch.get("routing_reasons", {}),
                       "failures": dispatch.get("failures", [])},
        "labeling": {"rounds": len(rounds), "rows_per_round": raw["options"]["label_rows"], "niceness": LABEL_NICENESS,
                     "rows_lost": sum(r["output"]["lost"] for r in rounds),
                     "rows_duplicated": sum(r["output"]["duplicated"] + r["output"]["foreign"] for r in rounds),
                     "rounds_exactly_one_ran": sum(r["exactly_one_ran"] for r in rounds),
                     # Which job wins is the scheduler's choice; the other is refused by the lock or, if
                     # it reached the output after the first had finished, by the finished output.
                     "second_job_refused_by_lock": sum(r["refused_by"] == "lock" for r in rounds),
                     "second_job_refused_by_finished_output": sum(r["refused_by"] == "finished output"
                                                                  for r in rounds),
                     "files_left_behind": sum(len(r["left_behind"]) for r in rounds)},
        "chaos": {key: value for key, value in chaos.items() if key != "events"},
        "crashes": {"total": sum(crashes.values()), **crashes},
    }
    errors = {name: result["error"] for name, result in traffic.items() if "error" in result}
    labeling = figures["labeling"]
    bars = {
        f"well-behaved calls served >= {WELL_BEHAVED_BAR_PCT:g}%":
            (figures["well_behaved"]["served_pct"] or 0.0) >= WELL_BEHAVED_BAR_PCT,
        "paid upstream answers delivered intact: 100%":
            bool(paid) and (figures["dispatcher"]["paid_delivered_pct"] or 0.0) >= PAID_DELIVERED_BAR_PCT,
        "labeled rows lost or duplicated: 0":
            labeling["rounds"] > 0 and labeling["rows_lost"] == 0 and labeling["rows_duplicated"] == 0,
        "label rounds with exactly one job running: all":
            labeling["rounds"] > 0 and labeling["rounds_exactly_one_ran"] == labeling["rounds"],
        "crashes: 0": figures["crashes"]["total"] == 0,
        "every traffic process reported": not errors,
    }
    return {"passed": all(bars.values()), "bars": bars, **figures, "traffic_errors": errors,
            "load_average_before": raw["load_average_before"], "load_average_after": raw["load_average_after"],
            "cpus": raw["cpus"], "machine_cpu_busy_pct": raw.get("machine_cpu_busy_pct"),
            "window_seconds": raw.get("window_seconds"), "options": raw["options"],
            "details": {"chaos_events": chaos["events"], "label_rounds": rounds,
                        "slow_connections": traffic.get("slow"), "capacity": raw["capacity"], "logs": logs,
                        "flood_schedule": {k: flood.get(k) for k in ("sent", "not_sent", "seconds")},
                        "well_behaved_schedule": {k: well.get(k) for k in ("sent", "not_sent", "seconds")},
                        "dispatch_schedule": {k: dispatch.get(k) for k in ("sent", "not_sent", "seconds")}}}


def _count_pct(part: int, whole: int, pct: float | None) -> str:
    return f"{part:,} of {whole:,} ({pct:.2f}%)" if pct is not None else f"{part:,} of {whole:,}"


def render_table(report: dict) -> str:
    """The short table `promptier soak` prints."""
    well, flood, dispatch = report["well_behaved"], report["flood"], report["dispatcher"]
    labeling, chaos, crashes = report["labeling"], report["chaos"], report["crashes"]
    outcomes = dispatch["by_outcome"]
    bars = list(report["bars"].values())
    ok = ["yes" if held else "**no**" for held in bars]
    rows = [
        ("well-behaved Classify calls served within their deadline "
         f"({well['deadline_ms']:g} ms; as the client saw them: p50 {_ms(well['p50_ms'])}, p99 "
         f"{_ms(well['p99_ms'])}; the server held them p99 {_ms((well['server_held'] or {}).get('p99_ms'))})",
         _count_pct(well["served"], well["calls"], well["served_pct"])
         + (f"; {well['not_sent']:,} more not sent (the client was starved)" if well["not_sent"] else ""),
         f">= {WELL_BEHAVED_BAR_PCT:g}%", ok[0]),
        (f"flooder ClassifyBatch calls ({flood['prompts_per_call']} prompts, {flood['calls_per_s']:.1f}/s = "
         f"{flood['calls_per_s'] * flood['prompts_per_call'] / flood['capacity_prompts_per_s']:.1f}x the "
         f"{flood['capacity_prompts_per_s']:,.0f} prompts/s measured; load generators at nice "
         f"{flood['load_generators_niceness']}) refused RESOURCE_EXHAUSTED",
         _count_pct(flood["refused_resource_exhausted"], flood["calls"], flood["refused_pct"]), "expected", "-"),
        ("paid upstream answers (200s) delivered intact through the dispatcher",
         _count_pct(dispatch["paid_delivered_intact"], dispatch["paid_answers"], dispatch["paid_delivered_pct"]),
         "100%", ok[1]),
        ("dispatcher requests: intact / cut streams ended with stream_interrupted / upstream 500s returned "
         "as 5xx / other 5xx / connection closed with no answer / mangled",
         " / ".join(f"{outcomes.get(kind, 0):,}" for kind in ("intact", "interrupted", "returned_5xx", "failed_5xx",
                                                             "transport_error", "mangled")) +
         f" of {dispatch['requests']:,}"
         + (f"; {dispatch['not_sent']:,} more not sent (the client was starved)" if dispatch["not_sent"] else ""),
         "-", "-"),
        (f"labeled rows lost / duplicated ({labeling['rounds']} rounds x {labeling['rows_per_round']:,} rows, "
         f"jobs at nice {labeling['niceness']})",
         f"{labeling['rows_lost']} / {labeling['rows_duplicated']}", "0 / 0", ok[2]),
        ("label rounds: exactly one job ran / the other refused by the lock, by the finished output",
         f"{labeling['rounds_exactly_one_ran']} / {labeling['second_job_refused_by_lock']}, "
         f"{labeling['second_job_refused_by_finished_output']} of {labeling['rounds']}",
         "all", ok[3]),
        ("serve worker kills (replaced) / reloads: serve (confirmed), dispatcher (confirmed)",
         f"{chaos['worker_kills']} ({chaos['worker_kills_replaced']}) / {chaos['serve_reloads']} "
         f"({chaos['serve_reloads_confirmed']}), {chaos['dispatcher_reloads']} "
         f"({chaos['dispatcher_reloads_confirmed']})",
         "-", "-"),
        ("crashes (main processes exited, tracebacks, workers dead unasked)", str(crashes["total"]), "0", ok[4]),
    ]
    lines = ["| what | result | bar | held |", "|---|---|---|---|"]
    lines += [f"| {what} | {result} | {bar} | {held} |" for what, result, bar, held in rows]
    return "\n".join(lines)


def render_timeline(report: dict) -> str:
    """When the well-behaved calls failed, beside what happened then, and how long the client's own
    event loop waited for a core: what tells a starved service from a machine short of CPU."""
    well, details = report["well_behaved"], report["details"]
    events = [f"{e['action']} {e['at_s']:g}s" for e in details["chaos_events"]]
    events += [f"label {r['at_s']:g}s" for r in details["label_rounds"]]
    bins: Counter[int] = Counter()
    for second, count in (well["failures_by_second"] or {}).items():
        bins[int(second) // TIMELINE_BIN_S * TIMELINE_BIN_S] += count
    failures = ", ".join(f"{start}-{start + TIMELINE_BIN_S}s: {count}" for start, count in sorted(bins.items()))
    lag = well["client_loop_lag"] or {}
    return (f"\nwell-behaved calls failed, by {TIMELINE_BIN_S} s of the window: {failures or 'none'}\n"
            f"events: {', '.join(events) or 'none'}\n"
            f"the client's event loop woke late from 10 ms sleeps by p50 {_ms(lag.get('p50_ms'))}, p99 "
            f"{_ms(lag.get('p99_ms'))}, max {_ms(lag.get('max_ms'))} ({well['client_loop_lags_over_deadline']} "
            f"times by more than the deadline); {well['answered_but_seen_late']} calls answered in time were "
            "seen late by the client")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"
