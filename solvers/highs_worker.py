"""HiGHS run in a child process.

OR-Tools and highspy each load their own HiGHS library; in one process whichever comes second fails with a
symbol clash. CP-SAT runs in-process, so highspy gets a fresh interpreter of its own (spawned, ~0.5 s).
"""

from __future__ import annotations

import numpy as np


def solve_lp(arrays: dict, time_limit: float | None, msg: bool) -> dict:
    """Solve a 0/1 program given as column-wise sparse arrays; returns solution, status and gap. Runs in its
    own child process (ILP's pool), so pointing its stdout at stderr is safe: ``highspy.Highs()`` prints its
    banner before any option can silence it, which broke the one-JSON-object-per-line output of benchmarks."""
    import os

    if not msg:
        os.dup2(2, 1)
    import highspy

    n_vars, n_rows = len(arrays["cost"]), len(arrays["row_lower"])
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n_vars, n_rows
    lp.col_cost_ = arrays["cost"]
    lp.col_lower_, lp.col_upper_ = np.zeros(n_vars), np.ones(n_vars)
    lp.row_lower_ = np.where(np.isfinite(arrays["row_lower"]), arrays["row_lower"], -highspy.kHighsInf)
    lp.row_upper_ = arrays["row_upper"]
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = arrays["start"]
    lp.a_matrix_.index_ = arrays["index"]
    lp.a_matrix_.value_ = arrays["value"]
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n_vars
    h = highspy.Highs()
    h.setOptionValue("output_flag", bool(msg))
    h.setOptionValue("mip_rel_gap", 1e-9)
    h.setOptionValue("threads", 2)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    h.passModel(lp)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    has_solution = info.primal_solution_status == 2
    return {
        "status": {
            highspy.HighsModelStatus.kOptimal: "optimal",
            highspy.HighsModelStatus.kInfeasible: "infeasible",
            highspy.HighsModelStatus.kTimeLimit: "time_limit",
        }.get(status, h.modelStatusToString(status)),
        "x": np.asarray(h.getSolution().col_value) if has_solution else None,
        "gap": float(info.mip_gap),
    }
