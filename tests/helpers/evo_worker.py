"""A worker process for the shared-study test: runs Evolutionary on digits-cnn against one storage URL."""

import json
import sys

import solvers.ilp  # noqa: F401  (OR-Tools before anything that may load highspy)
from mpsearch import Budget, estimate
from mpsearch.fitness import PlanFitness
from mpsearch.models import load
from solvers import Evolutionary, Problem

storage, worker, n_trials = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
zoo = load("digits-cnn", n_calib=64)
table = estimate(zoo.model, zoo.calibration, "sqnr", loss_fn="kl", estimator_params={"progress": False})
fitness = PlanFitness(zoo.model, zoo.calibration, "kl")
solver = Evolutionary(fitness, n_trials=n_trials, storage=storage, study_name="shared", seed=worker)
result = solver.solve(Problem(table, Budget(avg_bits=4.0)))
print(json.dumps({"worker": worker, "fitness": result.extra["fitness"], "calls": fitness.calls}))
