"""The search strategy per tag: read, override, adapt from recent results, suggest."""

from __future__ import annotations

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.errors import InvalidInput
from app.models import FAILED_STATUSES, FINISHED_STATUSES, KEEP, Experiment, Strategy
from app.services.experiments import get_tag

MODES = ("explore", "exploit", "combine", "ablation")
CATEGORIES = (
    "architecture", "optimizer", "hyperparams", "activation", "attention", "embedding",
    "normalization", "regularization", "scheduling", "initialization", "simplification",
    "combination", "ablation", "other",
)
# Categories an agent is nudged towards; combination, ablation and other are modes of work.
RESEARCH_CATEGORIES = CATEGORIES[:11]
MIN_EXPERIMENTS_TO_ADAPT = 5
RECENT_WINDOW = 10
PLATEAU_AFTER = 20
UNDEREXPLORED_BELOW = 3
HIGH_YIELD_KEEP_RATE = 0.3
# Cancelled runs say nothing about an idea; they do not count as results.
RESULT_STATUSES = tuple(s for s in FINISHED_STATUSES if s != "cancelled")


def strategy_public(strategy: Strategy) -> dict:
    return {
        "mode": strategy.mode,
        "explore_ratio": strategy.explore_ratio,
        "temperature": strategy.temperature,
        "updated_at": strategy.updated_at.isoformat() if strategy.updated_at else None,
        "reason": strategy.reason,
    }


def get_strategy(session: Session, *, tag: str) -> Strategy:
    get_tag(session, tag)
    return session.get(Strategy, tag)


def set_strategy(
    session: Session, *, tag: str, mode: str, reason: str, explore_ratio: float = 0.7, temperature: float = 1.0
) -> Strategy:
    if mode not in MODES:
        raise InvalidInput(f"mode must be one of {', '.join(MODES)}", fields={"mode": mode})
    strategy = session.scalars(select(Strategy).where(Strategy.tag == tag).with_for_update()).one_or_none()
    if strategy is None:
        get_tag(session, tag)
        strategy = Strategy(tag=tag)
        session.add(strategy)
    strategy.mode = mode
    strategy.reason = reason
    strategy.explore_ratio = explore_ratio
    strategy.temperature = temperature
    strategy.updated_at = func.now()
    session.flush()
    session.refresh(strategy)
    return strategy


def decide_mode(*, finished: int, recent: list[str], near_miss_count: int) -> tuple[str, float, str]:
    """The transition rule, on the statuses of the most recent finished experiments."""
    keep_rate = recent.count(KEEP) / len(recent)
    crash_rate = sum(1 for s in recent if s in FAILED_STATUSES) / len(recent)
    if crash_rate > 0.5:
        return "exploit", 0.3, f"high crash rate ({crash_rate * 100:.0f}%), switching to conservative tweaks"
    if keep_rate == 0 and finished > PLATEAU_AFTER:
        if near_miss_count >= 2:
            return "combine", 0.5, f"plateau with {near_miss_count} near-misses, trying combinations"
        return "ablation", 0.3, "long plateau, switching to ablation to identify essential components"
    if keep_rate > HIGH_YIELD_KEEP_RATE:
        return "exploit", 0.5, f"good keep rate ({keep_rate * 100:.0f}%), exploiting current direction"
    return "explore", 0.8, "default exploration"


def adapt(session: Session, *, tag: str) -> dict:
    get_tag(session, tag)
    results = (Experiment.tag == tag, Experiment.status.in_(RESULT_STATUSES))
    finished = session.scalar(select(func.count()).select_from(Experiment).where(*results))
    if finished < MIN_EXPERIMENTS_TO_ADAPT:
        return {"mode": "explore", "reason": "too few experiments to adapt"}
    recent = list(
        session.scalars(
            select(Experiment.status)
            .where(*results)
            .order_by(Experiment.finished_at.desc(), Experiment.id.desc())
            .limit(RECENT_WINDOW)
        )
    )
    near_miss_count = session.scalar(
        select(func.count()).select_from(Experiment).where(Experiment.tag == tag, Experiment.near_miss.is_(True))
    )
    mode, temperature, reason = decide_mode(finished=finished, recent=recent, near_miss_count=near_miss_count)
    strategy = set_strategy(
        session, tag=tag, mode=mode, reason=reason,
        explore_ratio=0.8 if mode == "explore" else 0.3, temperature=temperature,
    )
    return strategy_public(strategy)


def category_stats(session: Session, *, tag: str) -> dict[str, dict[str, int]]:
    rows = session.execute(
        select(
            Experiment.category,
            func.count(),
            func.sum(case((Experiment.status == KEEP, 1), else_=0)),
        )
        .where(Experiment.tag == tag, Experiment.status.in_(RESULT_STATUSES))
        .group_by(Experiment.category)
    )
    return {category: {"total": total, "kept": int(kept or 0)} for category, total, kept in rows}


def suggest(session: Session, *, tag: str) -> dict:
    strategy = get_strategy(session, tag=tag)
    stats = category_stats(session, tag=tag)
    total = sum(s["total"] for s in stats.values())
    underexplored = [c for c in RESEARCH_CATEGORIES if stats.get(c, {"total": 0})["total"] < UNDEREXPLORED_BELOW]
    high_yield = [
        c for c, s in stats.items()
        if s["total"] >= UNDEREXPLORED_BELOW and s["kept"] / s["total"] > HIGH_YIELD_KEEP_RATE
    ]
    near = list(
        session.scalars(
            select(Experiment)
            .where(Experiment.tag == tag, Experiment.near_miss.is_(True))
            .order_by(Experiment.delta.desc())
            .limit(6)
        )
    )
    # The seed counts and names every near miss of the tag; only the pairs use the closest six.
    near_miss_total, near_miss_categories = session.execute(
        select(func.count(), func.array_agg(func.distinct(Experiment.category)))
        .where(Experiment.tag == tag, Experiment.near_miss.is_(True))
    ).one()
    pairs = [
        {"a": a.id, "b": b.id, "hypotheses": [a.hypothesis, b.hypothesis], "categories": [a.category, b.category]}
        for i, a in enumerate(near)
        for b in near[i + 1:]
    ][:5]
    trend = list(
        reversed(
            session.scalars(
                select(Experiment.val_bpb)
                .where(Experiment.tag == tag, Experiment.status == KEEP)
                .order_by(Experiment.finished_at.desc())
                .limit(5)
            ).all()
        )
    )
    mode = strategy.mode if strategy else "explore"
    return {
        "strategy": mode,
        "total_experiments": total,
        "category_stats": stats,
        "underexplored_categories": underexplored,
        "high_yield_categories": high_yield,
        "near_misses_available": near_miss_total,
        "near_miss_categories": sorted(c for c in near_miss_categories or () if c is not None),
        "near_miss_pairs": pairs,
        "recent_bpb_trend": trend,
        "suggestions": build_suggestions(mode, underexplored, high_yield, near, trend),
    }


def build_suggestions(mode: str, underexplored: list[str], high_yield: list[str], near: list, trend: list[float]) -> list[str]:
    suggestions = []
    if mode == "explore":
        if underexplored:
            suggestions.append(f"Try changes in underexplored categories: {', '.join(underexplored[:3])}")
        suggestions.append("Try a radical architectural change")
    elif mode == "exploit":
        if high_yield:
            suggestions.append(f"Double down on high-yield categories: {', '.join(high_yield)}")
        suggestions.append("Make small incremental tweaks to the current best config")
    elif mode == "combine":
        if len(near) >= 2:
            suggestions.append(f'Combine near-misses: "{near[0].hypothesis}" + "{near[1].hypothesis}"')
        else:
            suggestions.append("Combine the changes of recent near-misses with the current best")
    elif mode == "ablation":
        suggestions.append("Remove one component at a time to identify what actually matters")
        suggestions.append("Try simplifying: fewer layers, simpler activations, remove value embeddings")
    if len(trend) >= 3 and trend[-1] >= trend[0]:
        suggestions.append("BPB trend is flat/worsening. Consider a strategy change.")
    return suggestions

