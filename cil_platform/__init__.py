"""The continual-learning platform around the model (shared/DESIGN.md): data/ (sources), training/ (the projection
update on Ray Train), storage/ (where bytes live: store, run state), and at the top level the experiment
(experiment.py: set up -> per-task step -> summary) with the parts it composes. Kept free of imports: Ray workers
import this package."""
