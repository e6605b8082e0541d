"""The compress job: trials as tasks (trials), the goal search (search), the report and gallery."""
