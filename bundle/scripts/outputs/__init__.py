"""Write: the registration's transform applied to slides, landmarks and annotations, its fields and the stage panels."""
