"""Markdown tables of a suite's records, and the page (``benchmarks/results/SUITE.md``)
that holds them: one section per protocol, so runs of another budget never mix."""
import dataclasses
import statistics

from .harness import parse_budget, same_machine
from .records import PROTOCOL_FIELDS


def _fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def _mean_spread(values):
    """``mean ± half the range`` over seeds, or the one value."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {(max(values) - min(values)) / 2:.1f}"


def _mean(values, digits=1):
    values = [v for v in values if v is not None]
    return _fmt(statistics.mean(values), digits) if values else "–"


def _grouped(records, *fields):
    groups = {}
    for r in records:
        groups.setdefault(tuple(r.get(f) for f in fields), []).append(r)
    return groups


def accuracy_table(records, row="method"):
    """One row per spec and ``row`` (a record field: the method, or the variant where a
    method has several), means over seeds; AP50_all as a share of the spec's joint run."""
    by_key = _grouped(records, "spec", row)
    lines = [
        "| spec | method | AP50_old | AP50_new | AP50_all | AP_all | forgetting AP50 | AP50_all / joint |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (spec, label), runs in by_key.items():
        joint = {r["seed"]: r["last_stage"]["AP50"] for r in by_key.get((spec, "joint"), [])}
        ratios = [r["last_stage"]["AP50"] / joint[r["seed"]] for r in runs if joint.get(r["seed"])]
        cells = [_mean_spread([r["last_stage"].get(k) for r in runs]) for k in ("AP50_old", "AP50_new", "AP50", "AP")]
        forgetting = _mean_spread([r["last_stage"].get("forgetting_AP50") for r in runs])
        ratio = _mean_spread([100 * x for x in ratios])
        lines.append(f"| {spec} | {label} | {' | '.join(cells)} | {forgetting} | {ratio} % |")
    return "\n".join(lines)


def one_stage_table(records):
    """The accuracy table of each detector's records, a row per variant (``ilmil + review``
    is ilmil's method with a term added, not another seed of it)."""
    return "\n\n".join(f"{detector}:\n\n{accuracy_table(group, row='row')}"
                        for (detector,), group in _grouped(records, "detector").items())


def ablation_table(records):
    """The finetune and full-ilmil rows first, then each variant; means over seeds."""
    lines = ["| variant | config change | AP50_old | AP50_new | AP50_all | AP_all | AP50_old vs ilmil |",
             "|---|---|---|---|---|---|---|"]
    by_spec = _grouped(records, "spec")
    for (spec,), spec_records in by_spec.items():
        variants = _grouped(spec_records, "variant")

        def mean(runs, key):
            values = [r["last_stage"].get(key) for r in runs if r["last_stage"].get(key) is not None]
            return statistics.mean(values) if values else None

        full = variants.get(("ilmil (all terms)",))
        first = [v for v in (("finetune",), ("ilmil (all terms)",)) if v in variants]
        for key in first + [v for v in variants if v not in first]:
            runs = variants[key]
            r = runs[0]
            off = f"`{' '.join(r['opts'])}`" if r["opts"] else ("every term (no teacher)" if r["method"] == "finetune" else "")
            change = ""
            if full and runs is not full and mean(runs, "AP50_old") is not None:
                change = f"{mean(runs, 'AP50_old') - mean(full, 'AP50_old'):+.1f}"
            cells = " | ".join(_mean_spread([x["last_stage"].get(k) for x in runs])
                               for k in ("AP50_old", "AP50_new", "AP50", "AP"))
            label = r["variant"] if len(by_spec) == 1 else f"{spec} {r['variant']}"
            lines.append(f"| {label} | {off} | {cells} | {change} |")
    return "\n".join(lines)


def stage_images_table(records):
    """One row per spec and variant (stage-image rule); means over seeds."""
    lines = ["| spec | variant | config change | last stage's train images | AP50_old | AP50_new | AP50_all | "
             "AP_all | forgetting AP50 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (spec, variant), runs in _grouped(records, "spec", "variant").items():
        change = f"`{' '.join(runs[0]['opts'])}`" if runs[0]["opts"] else ""
        cells = " | ".join(_mean_spread([r["last_stage"].get(k) for r in runs])
                           for k in ("num_train_images", "AP50_old", "AP50_new", "AP50", "AP", "forgetting_AP50"))
        lines.append(f"| {spec} | {variant} | {change} | {cells} |")
    return "\n".join(lines)


def _latency_device(records):
    """The device the records' latencies were timed on (records of before it was recorded: CPU)."""
    return "/".join(dict.fromkeys(r.get("latency_device", "cpu").upper() for r in records))


def pruning_table(records):
    """One row per variant, compared with the unpruned one. Records made before the
    fine-tuning was recorded show "–" for it."""
    base = next((r for r in records if r["ratio"] == 0), None)  # none: the unpruned row was not run
    lines = ["| pruned | fine-tuning of the pruned stage-0 model | parameters (M) | GFLOPs (detector) | "
             f"GFLOPs (backbone+FPN) | {_latency_device(records)} latency (ms) | stage-1 start AP50 (old classes) | "
             "AP50_all | AP50_old | "
             "AP50_new | vs unpruned |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        change = "–" if base is None else (
            f"params {100 * (r['params'] / base['params'] - 1):+.0f} %, GFLOPs "
            f"{100 * (r['gflops'] / base['gflops'] - 1):+.0f} %, AP50 {r['AP50_all'] - base['AP50_all']:+.1f}")
        lines.append(f"| {r['ratio']:.0%} | {_finetuning(r)} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | "
                     f"{r['gflops_backbone']:.2f} | {r['latency_ms']:.0f} | {_fmt(r.get('stage1_start_AP50'))} | "
                     f"{_fmt(r['AP50_all'])} | {_fmt(r['AP50_old'])} | {_fmt(r['AP50_new'])} | "
                     f"{change if r is not base else ''} |")
    return "\n".join(lines)


def kd_table(records):
    """Per detector: its teacher, then each student (means over seeds), a narrower student's
    rows after the default one's. Gap closed =
    (AP_student - AP_no KD) / (AP_teacher - AP_no KD), per seed, where the teacher is
    above the student without distillation (else there is no gap: "teacher below no KD");
    step time and peak memory relative to the student without distillation."""
    lines = ["| detector | model | AP50 | AP | AP50 gap closed | AP gap closed | step time (s) | vs no KD | "
             "peak memory (MiB) | vs no KD | parameters (M) | GFLOPs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    records = [{"student": "", **r} for r in records]  # records of before narrower students: the default one
    shown = set()  # detectors whose teacher row is written
    for (detector, student), runs in sorted(_grouped(records, "detector", "student").items()):
        plain = {r["seed"]: r for r in runs if r["row"] == "no KD"}
        teacher = runs[0]["teacher_model"]
        if detector not in shown:  # before its students: the default one first, then narrower ones
            shown.add(detector)
            # Every student of a seed names the same teacher: one record per seed, distilled or not.
            taught = list({r["seed"]: r for r in runs}.values())
            lines.append(f"| {detector} | teacher | {_mean_spread([r['teacher_AP50'] for r in taught])} | "
                         f"{_mean_spread([r['teacher_AP'] for r in taught])} | | | | | | | "
                         f"{teacher['params'] / 1e6:.2f} | {teacher['gflops']:.2f} |")
        label = f"{detector}, {student}" if student else detector
        # The student without distillation first: the rows below are measured against it.
        for (row,), group in sorted(_grouped(runs, "row").items(), key=lambda item: item[0] != ("no KD",)):
            def relative(key, of=None):
                pairs = [(r, plain.get(r["seed"])) for r in group]
                pairs = [(r, p) for r, p in pairs if p is not None and r.get(key) is not None
                         and p.get(key) is not None]
                if of is not None:  # gap closed of the AP key ``of``
                    # A teacher at or below the student has no gap to close: the ratio's
                    # sign would turn a loss against no KD into a positive share.
                    values = [(r[of] - p[of]) / (r[f"teacher_{of}"] - p[of])
                              for r, p in pairs if r[f"teacher_{of}"] > p[of]]
                    if not values and pairs:
                        return "teacher below no KD"
                    return _mean_spread([100 * v for v in values]) + " %" if values else "–"
                if key == "step_time_s":  # a ratio of two machines' times says nothing of the method
                    timed = [(r, p) for r, p in pairs if same_machine(r.get("machine", {}), p.get("machine", {}))]
                    if pairs and not timed:
                        return "other machine"
                    pairs = timed
                values = [r[key] / p[key] for r, p in pairs if p[key]]
                return f"{statistics.mean(values):.2f}x" if values else "–"

            gaps = ["", ""] if row == "no KD" else [relative("AP50", "AP50"), relative("AP", "AP")]
            size = group[0]["student_model"]
            lines.append(
                f"| {label} | {row} | {_mean_spread([r['AP50'] for r in group])} | "
                f"{_mean_spread([r['AP'] for r in group])} | {' | '.join(gaps)} | "
                f"{_mean([r['step_time_s'] for r in group], 3)} | "
                f"{'' if row == 'no KD' else relative('step_time_s')} | "
                f"{_mean([r['peak_rss_mib'] for r in group], 0)} | "
                f"{'' if row == 'no KD' else relative('peak_rss_mib')} | "
                f"{size['params'] / 1e6:.2f} | {size['gflops']:.2f} |")
    return "\n".join(lines)


def kd_speed_table(records):
    """Per detector: each student's median step time and peak memory, and their ratios to
    the student without distillation timed on the same machine."""
    lines = ["| detector | model | step time (s) | vs no KD | peak memory (MiB) | vs no KD |", "|---|---|---|---|---|---|"]
    for (detector,), runs in sorted(_grouped(records, "detector").items()):
        plain = next((r for r in runs if r["row"] == "no KD"), None)
        for r in sorted(runs, key=lambda r: r is not plain):
            if r is plain or plain is None:
                ratios = ["", ""]
            elif not same_machine(r.get("machine", {}), plain.get("machine", {})):
                ratios = ["other machine", "other machine"]
            else:
                ratios = [f"{r[key] / plain[key]:.2f}x" for key in ("step_time_s", "peak_rss_mib")]
            lines.append(f"| {detector} | {r['row']} | {r['step_time_s']:.3f} | {ratios[0]} | "
                         f"{r['peak_rss_mib']:.0f} | {ratios[1]} |")
    return "\n".join(lines)


def _finetuning(record):
    if record["ratio"] == 0:
        return ""
    if "finetune_iters" not in record:
        return "–"
    if not record["finetune_iters"]:
        return "none"
    teacher = "unpruned model as teacher" if record["finetune_teacher"] else "plain"
    return f"{record['finetune_iters']} it, {teacher}"


def speed_table(records):
    # Records made before the bfloat16 teacher existed have no such columns.
    bfloat16 = all("ilmil_bfloat16_teacher" in r for r in records)
    header = ["measure", "finetune", "ilmil", "ratio"] + (["ilmil, bfloat16 teacher", "ratio"] if bfloat16 else [])
    rows = []
    for record in records:
        f, i = record["finetune"], record["ilmil"]
        b = record.get("ilmil_bfloat16_teacher")
        rows += [
            [f"training step, median over {i['steps_timed']} it (s)", f"{f['step_time_median_s']:.3f}",
             f"{i['step_time_median_s']:.3f}", f"{record['step_time_ratio']:.2f}",
             *([f"{b['step_time_median_s']:.3f}", f"{record['step_time_ratio_bfloat16_teacher']:.2f}"] if b else [])],
            ["peak resident memory (MiB)", f"{f['peak_rss_mib']:.0f}", f"{i['peak_rss_mib']:.0f}",
             f"{record['peak_memory_ratio']:.2f}",
             *([f"{b['peak_rss_mib']:.0f}", f"{b['peak_rss_mib'] / f['peak_rss_mib']:.2f}"] if b else [])],
        ]
        if "peak_cuda_memory_mib" in i:  # runs on a GPU
            rows.append(["peak GPU memory allocated (MiB)", f"{f['peak_cuda_memory_mib']:.0f}",
                         f"{i['peak_cuda_memory_mib']:.0f}", f"{i['peak_cuda_memory_mib'] / f['peak_cuda_memory_mib']:.2f}",
                         *([f"{b['peak_cuda_memory_mib']:.0f}",
                            f"{b['peak_cuda_memory_mib'] / f['peak_cuda_memory_mib']:.2f}"] if b else [])])
        rows += [
            ["evaluation time per 100 images (s)", f"{f['eval_s_per_100_images']:.1f}",
             f"{i['eval_s_per_100_images']:.1f}", ""],
            ["inference + evaluation (images/s)", "", f"{record['inference_images_per_s']:.1f}", ""],
            ["shapes generation (images/s)", "", f"{record['shapes_generation_images_per_s']:.0f}", ""],
        ]
    lines = [header] + [row + [""] * (len(header) - len(row)) for row in rows]
    text = ["|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|" for cells in lines]
    return "\n".join([text[0], "|---" * len(header) + "|", *text[1:]])


def _machines(records):
    seen = {}
    for r in records:
        m = r.get("machine")
        if m:
            cpu = f"{m['cpu']} ({m['cpu_model']})" if m.get("cpu_model") else m["cpu"]
            text = (f"{cpu}, {m['cores']} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
                    + f"; Python {m['python']}, torch {m['torch']}, detectron2 {m['detectron2']}")
            seen[text] = None
    return "; ".join(seen) or "not recorded"


def _reproduce(suite, quick, setting, records):
    """The command that reuses (or retrains) a section's runs."""
    args = ["python benchmarks/run.py --suite", suite.name] + (["--quick"] if quick else [])
    first = records[0]
    specs = list(dict.fromkeys(r["spec"] for r in records if r.get("spec")))
    seeds = list(dict.fromkeys(r["seed"] for r in records if r.get("seed") is not None))
    given = {"specs": specs if tuple(specs) != setting.specs else None,
             "seeds": seeds if tuple(seeds) != setting.seeds else None}
    if first.get("budget"):
        given["base_iters"], given["iters"] = parse_budget(first["budget"])
    given.update(num_train=first.get("num_train"), num_test=first.get("num_test"))
    defaults = dataclasses.replace(setting, base_iters=setting.base_iters or setting.iters)
    for name, value in given.items():
        if value and name not in suite.refuses and value != getattr(defaults, name):
            args += [f"--{name.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    # The section's variants when they are some of the suite's: the whole suite would train the others.
    names = [v.name for v in setting.variants]
    variants = list(dict.fromkeys(r["variant"] for r in records if r.get("variant")))
    if "variants" not in suite.refuses and set(variants) < set(names):
        args += ["--variants", *(f'"{v}"' if " " in v else v for v in variants)]
    if first.get("extra_opts"):  # after a list option, "--" ends it
        args += ["--", *first["extra_opts"]]
    return " ".join(args)


def suite_page(suite, quick, records):
    """``benchmarks/results/SUITE_SIZE.md``: one section per protocol in the records."""
    setting = suite.setting(quick)
    out = [f"# {suite.label(quick)}", "",
           f"Generated by `benchmarks/run.py` from `{suite.label(quick)}.json`; a re-run rewrites this page.", ""]
    sections = {}
    for r in records:
        sections.setdefault(tuple(str(r.get(f)) for f in PROTOCOL_FIELDS), []).append(r)
    for section in sections.values():
        first = section[0]
        base_iters, iters = parse_budget(first["budget"]) if first.get("budget") else (None, None)
        title = suite.protocol.format(num_train=first.get("num_train") or setting.num_train,
                                      num_test=first.get("num_test") or setting.num_test,
                                      base_iters=base_iters or setting.base_iters, iters=iters or setting.iters,
                                      warmup=setting.warmup)
        if first.get("extra_opts"):
            title += f"; overrides `{' '.join(first['extra_opts'])}`"
        if len(sections) > 1:
            out += [f"## {title}", ""]
        else:
            out += [f"- protocol: {title}"]
        out += [f"- machine: {_machines(section)}",
                f"- command: `{_reproduce(suite, quick, setting, section)}`", "", suite.table(section), ""]
    return "\n".join(out)
