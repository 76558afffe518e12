"""Helpers shared by the jobs and the tests: a real PACS on loopback (:mod:`orthanc`), a real
Ray cluster in a network namespace (:mod:`netns_cluster`), a second model as a site would
deploy one (:mod:`site_model`), the simulated hospitals of the experiments
(:mod:`hospitals`) and the measured, unused levers of a site model (:mod:`levers`). A script
under jobs/bench/ or jobs/experiments/ imports them after putting jobs/ on its path;
tests/conftest.py does the same. Nothing here is a benchmark or an experiment, so that a
test fixture never comes from one, and no experiment imports another's helpers."""
