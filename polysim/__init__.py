"""polysim: a Polymarket-compatible simulated exchange (Gamma, CLOB, Data API, market WebSocket).

Run `polysim --port 0 --markets 20 --seed 1 --trade-rate 5`; see polysim.cli for options
and polysim.server for the routes. It imports neither collectord nor workers.
"""
