"""What people read: tables and summary lines, a study's view for pages, and the live dashboard.
Read-only: nothing below imports a view.
"""
