"""Phase 3 of framegate: tables and figures from run folders."""
