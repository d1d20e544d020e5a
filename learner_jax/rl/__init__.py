"""The RL mathematics of the learner: advantage estimators, KL estimators/controllers, PPO losses (pure JAX)."""
