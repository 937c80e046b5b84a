"""Flower ClientApp: local training and evaluation on a node's own users (DESIGN.md §3), and the
local objectives it trains behind one interface (:mod:`lumosrec.client.objectives`)."""
