"""Planning with world models: CEM (one batched rollout per iteration), rollouts through the controller or the
action-conditioned world model, and the protocols' metrics (ATE, RPE, Δxyz). No Ray, no MLflow."""
