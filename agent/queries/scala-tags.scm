; Scala definitions: classes and case classes, traits, objects (as modules), enums, type aliases, and defs:
; methods inside a class, trait, object, enum, given or extension; functions at the top level or in a block.
(class_definition name: (identifier) @name) @definition.class
(trait_definition name: (identifier) @name) @definition.trait
(object_definition name: (identifier) @name) @definition.module
(package_object name: (identifier) @name) @definition.module
(enum_definition name: (identifier) @name) @definition.enum
(type_definition name: (type_identifier) @name) @definition.type

; defs that belong to a template: methods
(class_definition body: (template_body [(function_definition name: (identifier) @name) (function_declaration name: (identifier) @name)] @definition.method))
(trait_definition body: (template_body [(function_definition name: (identifier) @name) (function_declaration name: (identifier) @name)] @definition.method))
(object_definition body: (template_body [(function_definition name: (identifier) @name) (function_declaration name: (identifier) @name)] @definition.method))
(enum_definition body: (enum_body [(function_definition name: (identifier) @name) (function_declaration name: (identifier) @name)] @definition.method))
(given_definition body: (with_template_body [(function_definition name: (identifier) @name) (function_declaration name: (identifier) @name)] @definition.method))
(instance_expression (template_body [(function_definition name: (identifier) @name) (function_declaration name: (identifier) @name)] @definition.method))
(extension_definition [(function_definition name: (identifier) @name) (function_declaration name: (identifier) @name)] @definition.method)

; defs at the top level, in a package or package object, or local to a block: functions
(compilation_unit (function_definition name: (identifier) @name) @definition.function)
(package_clause body: (template_body (function_definition name: (identifier) @name) @definition.function))
(package_object body: (template_body (function_definition name: (identifier) @name) @definition.function))
(block (function_definition name: (identifier) @name) @definition.function)
(indented_block (function_definition name: (identifier) @name) @definition.function)
