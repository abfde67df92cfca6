; Bash definitions: functions, in both the `name() { ... }` and `function name { ... }` forms (nested ones too).
(function_definition name: (word) @name) @definition.function
