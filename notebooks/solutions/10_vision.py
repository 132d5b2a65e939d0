"""Solutions to the exercises for notebooks/10_vision (for teachers; the notebook comes from another branch)."""

patches_per_side = 896 // 14  # 64
ANSWERS = {"vision.1": patches_per_side**2, "vision.2": (patches_per_side // 4, patches_per_side // 4)}
