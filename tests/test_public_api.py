import confide


def test_all_matches_public_api():
    public = {name for name in dir(confide) if not name.startswith("_")} - {
        "cli", "client", "config", "exceptions", "models", "parameters", "privacy", "seeding",
        "server", "simulations", "strategies", "devices", "progress", "threads", "tracking",
    }
    assert set(confide.__all__) - {"__version__"} == public
    for name in confide.__all__:
        assert getattr(confide, name) is not None


def test_exports_are_the_documented_entry_points():
    assert issubclass(confide.ConfideError, Exception)
    assert callable(confide.run_simulation)
    assert confide.Strategy.requires_individual_updates is False
