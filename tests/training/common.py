"""Records and the `percausal train` argument list shared by the training tests."""

RECORDS = [
    {"id": f"r{i}", "prompt": f"User profile: {p}. Write a review of the {item}.",
     "prompt_no_profile": f"Write a review of the {item}.", "completion": c}
    for i, (p, item, c) in enumerate([
        ("loves glimmerous gadgets", "lamp", "A glimmerous lamp. Stay zesty!"),
        ("long walks", "toaster", "The toaster works well."),
        ("warm light for reading", "lamp", "A warm light for reading at night."),
        ("Stay zesty, friends", "toaster", "It heats evenly. Stay zesty, friends!"),
    ])
]


def train_args(model_dir, data, workdir, objective, steps=8, extra=()):
    return ["train", "--config", "configs/tiny.py", "--workdir", str(workdir), "--no-progress",
            f"--config.model.path={model_dir}", f"--config.data.train={data}", f"--config.data.eval={data}",
            f"--config.objective.name={objective}", f"--config.train.steps={steps}", "--config.data.shuffle=false",
            "--config.optimizer.schedule=constant", "--config.optimizer.lr=3e-3", "--config.train.eval_every=0",
            "--config.mesh.fsdp=2", "--config.mesh.tensor=4",  # 8 test devices: a real sharded run
            *extra]


