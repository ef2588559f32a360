"""The deploy wing (controller side): render/plan, compose, capacity, weights, the fleet report. Never imported by `serve`."""
