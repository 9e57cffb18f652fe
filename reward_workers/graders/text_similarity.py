"""text_similarity: fuzzy match (rapidfuzz), BLEU (sacrebleu) or ROUGE-N/L F1 (rouge-score),
each scaled to [0, 1]. The libraries load once, when the runner builds the grader."""

from __future__ import annotations

from reward_workers.graders.templates import render_text


def _metric(name: str):
    if name == "fuzzy_match":
        from rapidfuzz import fuzz

        return lambda text, reference: fuzz.ratio(text, reference) / 100.0
    if name == "bleu":
        import sacrebleu

        return lambda text, reference: sacrebleu.sentence_bleu(text, [reference]).score / 100.0
    from rouge_score import rouge_scorer

    rouge_type = name.replace("_", "").replace("rougel", "rougeL")  # rouge_1 -> rouge1, rouge_l -> rougeL
    scorer = rouge_scorer.RougeScorer([rouge_type])
    return lambda text, reference: scorer.score(reference, text)[rouge_type].fmeasure


def build(spec: dict):
    metric = _metric(spec["evaluation_metric"])
    threshold = spec.get("pass_threshold")

    def grade(sample: dict, item: dict) -> dict:
        score = metric(render_text(spec["input"], sample, item), render_text(spec["reference"], sample, item))
        components = {spec["evaluation_metric"]: score}
        if threshold is not None:
            components["passed"] = float(score >= threshold)
        return {"reward": score, "components": components}

    return grade
